import pytest
import torch

from qtool.errors import QtoolError
from qtool.quantize.apply import quantize_model
from qtool.quantize.format import write_checkpoint
from qtool.quantize.scheme import Override, Recipe, Scheme
from qtool.runtime.loader import load_model
from qtool.runtime.quant_linear import QuantLinear

SCHEMES = [Scheme(4, 32, False), Scheme(4, 32, True), Scheme(8, -1, True), Scheme(3, 64, False), Scheme(2, 16, True)]


def quantized_checkpoint(model, folder, recipe):
    result = quantize_model(model, recipe)
    write_checkpoint(folder, model, result.weights, result.skipped, "compressed-tensors", {})
    return result


def dequantized_reference(model, result):
    """The original model with each quantized weight replaced by its dequantized values."""
    import copy

    reference = copy.deepcopy(model).float()
    for name, weight in result.weights.items():
        reference.get_submodule(name).weight.data = weight.dequantize()
    return reference


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_loaded_model_computes_with_the_stored_codes(tiny_llama, tmp_path, scheme):
    result = quantized_checkpoint(tiny_llama, tmp_path / "ckpt", Recipe(scheme=scheme))
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tokens = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = dequantized_reference(tiny_llama, result)(tokens).logits
        assert torch.allclose(loaded(tokens).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_transformers_with_compressed_tensors_loads_the_same_model(tiny_llama_dir, tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_llama_dir, dtype=None)
    quantized_checkpoint(model, tmp_path / "ckpt", Recipe(scheme=scheme, overrides=(Override("layers.1.mlp.up", None),)))
    ours = load_model(tmp_path / "ckpt", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        difference = (ours(tokens).logits - theirs(tokens).logits).abs().max().item()
    assert difference < 1e-3


def test_untied_checkpoints_keep_their_own_head(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    quantized_checkpoint(model, tmp_path / "ckpt", Recipe())
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_checkpoint_missing_a_tensor_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    quantized_checkpoint(tiny_llama, tmp_path / "ckpt", Recipe())
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(QtoolError, match="lacks tensors the model needs: model.norm.weight"):
        load_model(tmp_path / "ckpt")


def test_corrupt_safetensors_is_a_clear_error(tiny_llama, tmp_path):
    quantized_checkpoint(tiny_llama, tmp_path / "ckpt", Recipe())
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(QtoolError, match="not a readable safetensors file"):
        load_model(tmp_path / "ckpt")


def test_transformers_loads_mixed_config_groups_with_qtools_logits(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_llama_dir, dtype=None)
    recipe = Recipe(scheme=Scheme(4, 32, False), overrides=(
        Override(r"mlp\.(gate|up)_proj", Scheme(8, -1, True)), Override(r"layers\.1\.self_attn\.o_proj", Scheme(4, 64, True)),
        Override(r"layers\.0\.mlp\.down", None)))
    quantized_checkpoint(model, tmp_path / "ckpt", recipe)
    ours = load_model(tmp_path / "ckpt", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert isinstance(ours.model.layers[0].mlp.up_proj, QuantLinear) and not isinstance(ours.model.layers[0].mlp.down_proj,
                                                                                          QuantLinear)
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max().item() < 1e-3

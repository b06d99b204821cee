"""--format gptq: AutoGPTQ/GPTQModel's v1 layout, written and read back bit for bit, decoded by a
reader written here from the format's description, and checkpoints laid out as those tools lay
them out (sym zeros 0x77777777, desc_act g_idx, gptq_v2 zeros) loaded into qtool's runtime."""

import json
import re

import pytest
import torch

from qtool.errors import QtoolError
from qtool.quantize.apply import quantize_model
from qtool.quantize.format import read_checkpoint, write_checkpoint
from qtool.quantize.format.gptq import layer_schemes, misfit
from qtool.quantize.grid import fit_minmax, quantize_to_codes
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Override, Recipe, Scheme

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 81]])


def gptq_checkpoint(model, folder, recipe):
    result = quantize_model(model, recipe, scale_dtype=torch.float16)
    write_checkpoint(folder, model, result.weights, result.skipped, "gptq", {"recipe": recipe.to_dict()})
    return result


def with_act_order(weights: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The same codes and grids with groups scattered over the columns, as act-order leaves them."""
    scattered = {}
    for name, weight in weights.items():
        groups = weight.scheme.group_count(weight.in_features)
        g_idx = torch.randperm(weight.in_features).remainder(groups).to(torch.int32)
        scattered[name] = QuantizedWeight(weight.packed, weight.scales, weight.zeros, weight.scheme, weight.shape, g_idx)
    return scattered


def decode_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """GPTQ's packing as its description says it: along dim 0, each column of int32 words is one
    little-endian bit stream, value i taking bits [bits*i, bits*(i+1)). Decoded bit by bit."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((unsigned.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, words.shape[1])
    weights = 2 ** torch.arange(bits).view(1, bits, 1)
    return (stream[: count * bits].reshape(count, bits, -1) * weights).sum(1)


def decode_gptq_layer(tensors: dict, name: str, bits: int, in_features: int) -> torch.Tensor:
    """w[o, i] = (q[i, o] - (qzeros[g, o] + 1)) * scales[g, o] with g = g_idx[i], from the stored tensors alone."""
    scales, g_idx = tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"].long()
    q = decode_stream(tensors[f"{name}.qweight"], bits, in_features)  # [in, out]
    zeros = decode_stream(tensors[f"{name}.qzeros"].t(), bits, scales.shape[1]).t() + 1  # [G, out]
    return ((q - zeros[g_idx]) * scales[g_idx]).t()


@pytest.mark.parametrize("scheme", [Scheme(3, 32, True), Scheme(8, -1, False)], ids=lambda s: s.describe())
def test_quantization_config_says_the_scheme(tiny_llama, tmp_path, scheme):
    gptq_checkpoint(tiny_llama, tmp_path / "ckpt", Recipe(scheme=scheme))  # round trips: test_format_round_trips.py
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
                      "sym": scheme.symmetric, "desc_act": False, "checkpoint_format": "gptq", "lm_head": False,
                      "dynamic": {"-:lm_head$": {}}}


@pytest.mark.parametrize("scheme", [Scheme(3, 32, False), Scheme(4, 16, True), Scheme(8, -1, False)],
                         ids=lambda s: s.describe())
def test_an_independent_decoder_gives_the_original_dequantized_weights(tiny_llama, tmp_path, scheme):
    from safetensors.torch import load_file

    result = quantize_model(tiny_llama, Recipe(scheme=scheme), scale_dtype=torch.float16)
    weights = with_act_order(result.weights) if scheme.group_size != -1 else result.weights
    write_checkpoint(tmp_path / "ckpt", tiny_llama, weights, result.skipped, "gptq", {})
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    for name, weight in weights.items():
        decoded = decode_gptq_layer(tensors, name, scheme.bits, weight.in_features)
        assert torch.equal(decoded, weight.dequantize()), name
        original = tiny_llama.get_submodule(name).weight.detach()
        if weight.g_idx is None:  # act-order groups were scattered at random: only the codes' own grid holds
            assert ((decoded - original).norm() / original.norm()).item() < (0.2 if scheme.bits == 3 else 0.1)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["desc_act"] == (
        scheme.group_size != -1)


def test_mixed_schemes_and_skips_become_dynamic_entries_vllm_and_gptqmodel_match(tiny_llama, tmp_path):
    recipe = Recipe(scheme=Scheme(4, 32, True), overrides=(
        Override(r"layers\.0\.mlp", Scheme(8, -1, False)), Override(r"layers\.1\.self_attn\.(q|k|v)_proj", None)))
    result = gptq_checkpoint(tiny_llama, tmp_path / "mixed", recipe)
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 32, True)
    dynamic = config["dynamic"]
    assert dynamic[r"+:model\.layers\.0\.mlp\.(gate_proj|gate_up_proj)$"] == {
        "bits": 8, "group_size": -1, "sym": False, "desc_act": False}
    assert r"-:model\.layers\.1\.self_attn\.(q_proj|qkv_proj)$" in dynamic and "-:lm_head$" in dynamic

    def first_match(layer):  # GPTQModel's and vLLM's rule: the first pattern that re.match-es the name
        return next((key for key in dynamic if re.match(key[2:], layer)), None)

    assert first_match("model.layers.1.self_attn.qkv_proj").startswith("-:")  # vLLM's fused name is skipped too
    assert first_match("model.layers.0.mlp.gate_up_proj").startswith("+:")
    assert first_match("model.layers.0.self_attn.qkv_proj") is None  # the base scheme
    loaded = read_checkpoint(tmp_path / "mixed")
    assert {name: w.scheme for name, w in loaded.weights.items()} == {name: w.scheme for name, w in result.weights.items()}
    assert "model.layers.1.self_attn.q_proj.weight" in loaded.dense
    from qtool.runtime.summary import summarize

    assert "model.layers.1.self_attn.q_proj" in summarize(tmp_path / "mixed").dense_linears


def write_as_gptq_tools_do(folder, model, result, checkpoint_format: str, act_order: bool, settings_file: str):
    """A checkpoint laid out by hand from GPTQ's description, as AutoGPTQ (v1) or GPTQModel (v2)
    write it: qweight packed along the input, qzeros packed along the output (minus one in v1, even
    the symmetric 8s: 0x77777777), fp16 scales, g_idx for every layer, bias-free linears."""
    from safetensors.torch import save_file

    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if name.removesuffix(".weight") not in result.weights and name != "lm_head.weight"}
    for name, weight in result.weights.items():
        bits, out_features = weight.scheme.bits, weight.out_features
        zeros = weight.zero_points().t() - (1 if checkpoint_format == "gptq" else 0)  # [G, out]
        g_idx = torch.arange(weight.in_features, dtype=torch.int32) // weight.scheme.group_size
        if act_order:
            g_idx = weight.g_idx
        words = torch.zeros(zeros.shape[0], out_features * bits // 32, dtype=torch.int64)
        for o in range(out_features):  # one value at a time, the way the description reads
            for g in range(zeros.shape[0]):
                bit = bits * o
                words[g, bit // 32] |= (int(zeros[g, o]) << (bit % 32)) & 0xFFFFFFFF
        tensors[f"{name}.qzeros"] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        tensors[f"{name}.qweight"] = weight.packed.t().contiguous()  # the same stream, per column
        tensors[f"{name}.scales"] = weight.scales.t().contiguous()
        tensors[f"{name}.g_idx"] = g_idx
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    settings = {"bits": 4, "group_size": 32, "desc_act": act_order, "damp_percent": 0.01, "true_sequential": True,
                "sym": result.weights[next(iter(result.weights))].zeros is None}
    if settings_file == "quantize_config.json":  # AutoGPTQ before transformers: no quant_method, a file of its own
        (folder / settings_file).write_text(json.dumps({**settings, "model_file_base_name": "model"}))
    else:
        config["quantization_config"] = {"quant_method": "gptq", **settings, "checkpoint_format": checkpoint_format,
                                         "meta": {"quantizer": ["gptqmodel:2.0.0"]}}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("checkpoint_format, sym, act_order, settings_file", [
    ("gptq", True, False, "quantize_config.json"), ("gptq", False, True, "config.json"),
    ("gptq_v2", False, False, "config.json"), ("gptq_v2", True, True, "config.json")])
def test_checkpoints_laid_out_as_gptq_tools_do_load_with_the_weights_they_hold(tiny_llama, tmp_path, checkpoint_format,
                                                                                sym, act_order, settings_file):
    from qtool.runtime.loader import load_model

    result = quantize_model(tiny_llama, Recipe(scheme=Scheme(4, 32, sym)), scale_dtype=torch.float16)
    if act_order:
        result.weights.update(with_act_order(result.weights))
    tiny_llama.tie_weights()
    folder = tmp_path / "theirs"
    folder.mkdir()
    write_as_gptq_tools_do(folder, tiny_llama, result, checkpoint_format, act_order, settings_file)
    if (result.weights["model.layers.0.mlp.up_proj"].zero_points() == 0).any() and checkpoint_format == "gptq":
        pytest.skip("a zero point of 0 has no v1 form")
    loaded = read_checkpoint(folder)
    for name, weight in result.weights.items():
        assert torch.equal(loaded.weights[name].dequantize(), weight.dequantize()), name
    reference = load_model_with_weights(tiny_llama, result.weights)
    with torch.no_grad():
        assert torch.equal(load_model(folder)(TOKENS).logits, reference(TOKENS).logits)


def load_model_with_weights(model, weights):
    import copy

    reference = copy.deepcopy(model).float()
    for name, weight in weights.items():
        reference.get_submodule(name).weight.data = weight.dequantize()
    return reference


def test_gptq_and_compressed_tensors_checkpoints_of_the_same_weights_give_the_same_logits(tiny_llama, tmp_path):
    from qtool.runtime.loader import load_model

    recipe = Recipe(scheme=Scheme(4, 32, False), overrides=(Override("down_proj", Scheme(8, -1, True)),))
    result = quantize_model(tiny_llama, recipe, scale_dtype=torch.float16)
    for fmt in ("compressed-tensors", "gptq"):
        write_checkpoint(tmp_path / fmt, tiny_llama, result.weights, result.skipped, fmt, {})
    with torch.no_grad():
        logits = [load_model(tmp_path / fmt)(TOKENS).logits for fmt in ("compressed-tensors", "gptq")]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("flags, message", [
    (["--bits", "5"], "qtool: error: --format gptq holds 2, 3, 4 or 8-bit weights; W5 g64 asym does not fit: "
                      "use --format compressed-tensors"),
    (["--method", "squeezellm", "--no-sensitivity"], "qtool: error: squeezellm writes look-up-table weights, which "
                                                     "--format gptq cannot hold; use --format qtool"),
])
def test_recipes_gptq_cannot_hold_are_refused_up_front(capsys, tiny_llama_dir, tmp_path, flags, message):
    from qtool.cli.app import main

    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--format", "gptq", *flags]) == 2
    assert capsys.readouterr().err.strip().endswith(message.removeprefix("qtool: error: "))
    assert not (tmp_path / "o").exists()


def grid_weight(out_features, in_features, scheme, scale_dtype=torch.float16, g_idx=None):
    weight = torch.randn(out_features, in_features)
    grid = fit_minmax(weight, scheme, scale_dtype)
    return QuantizedWeight.from_codes(quantize_to_codes(weight, grid, scheme), grid, scheme, g_idx=g_idx)


def test_layers_gptq_cannot_hold_unchanged_are_named_with_the_reason():
    assert misfit("a", grid_weight(64, 48, Scheme(3, 16, True))) == (
        "a: 48 input features do not fill whole 3-bit GPTQ words (a multiple of 32); use --format compressed-tensors")
    assert misfit("b", grid_weight(12, 64, Scheme(4, 32, True))) == (
        "b: 12 output features do not fill whole 4-bit GPTQ words (a multiple of 8); use --format compressed-tensors")
    assert misfit("c", grid_weight(16, 64, Scheme(4, 32, True), torch.float32)) == (
        "c: scales do not fit float16 exactly; use --format compressed-tensors")
    zero = grid_weight(16, 64, Scheme(4, 32, False))
    zero.zeros[0, 0] = 0
    assert misfit("d", zero) == (
        "d: a zero point of 0 does not fit GPTQ v1 (it stores zero points minus one); use --format compressed-tensors")
    lut = QuantizedWeight(zero.packed, None, None, Scheme(4, -1, lut=True), zero.shape, lut=torch.zeros(16, 1, 16))
    assert misfit("e", lut) == "e: look-up tables and sparse outliers do not fit --format gptq; use --format qtool"
    assert misfit("f", grid_weight(16, 64, Scheme(4, 32, False))) is None


def test_contradictory_or_unknown_gptq_checkpoints_are_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    gptq_checkpoint(tiny_llama, tmp_path / "ckpt", Recipe(scheme=Scheme(4, 32, True)))
    config_path, weights_path = tmp_path / "ckpt" / "config.json", tmp_path / "ckpt" / "model.safetensors"
    config = json.loads(config_path.read_text())
    tensors = load_file(weights_path)

    def refused(message, tensors=tensors, **settings):
        config_path.write_text(json.dumps({**config, "quantization_config": {**config["quantization_config"], **settings}}))
        save_file(tensors, weights_path)
        with pytest.raises(QtoolError) as error:
            read_checkpoint(tmp_path / "ckpt")
        assert str(error.value) == message

    refused("GPTQ checkpoint_format 'marlin' is not supported (only gptq, gptq_v2)", checkpoint_format="marlin")
    refused("model.layers.0.mlp.down_proj: sym is true but qzeros are not all 8", checkpoint_format="gptq_v2")
    refused(r"model.layers.0.mlp.down_proj has packed weights but quantization_config's dynamic skips it",
            dynamic={r"-:.*down_proj$": {}})
    refused("model.layers.0.mlp.down_proj: 5-bit GPTQ weights are not supported (2, 3, 4 or 8)",
            dynamic={r"+:.*down_proj$": {"bits": 5}})
    wrapped = dict(tensors)
    wrapped["model.layers.0.mlp.down_proj.qzeros"] = torch.full_like(wrapped["model.layers.0.mlp.down_proj.qzeros"], -1)
    refused("model.layers.0.mlp.down_proj: qzeros hold a zero point of 16, which is what a zero point of 0 becomes in "
            "GPTQ v1; re-export the checkpoint as gptq_v2", tensors=wrapped, sym=False)


def test_layer_schemes_follow_the_first_matching_dynamic_entry():
    config = {"bits": 4, "group_size": 128, "sym": True, "dynamic": {
        r"+:.*\.1\..*": {"bits": 8, "group_size": 32}, r".*mlp.*": {"bits": 2}, r"-:.*lm_head": {}}}
    schemes = layer_schemes(config, ["m.layers.1.mlp.up", "m.layers.0.mlp.up", "m.layers.0.attn.q"])
    assert schemes == {"m.layers.1.mlp.up": Scheme(8, 32, True), "m.layers.0.mlp.up": Scheme(2, 128, True),
                       "m.layers.0.attn.q": Scheme(4, 128, True)}


def test_a_calibrated_act_order_run_writes_gptq_that_loads_like_its_compressed_tensors_twin(tiny_llama_dir, tiny_text_file,
                                                                                         tmp_path):
    from qtool.cli.app import main
    from qtool.runtime.loader import load_model

    flags = ["--method", "gptq", "--act-order", "group", "--group-size", "32", "--calib", str(tiny_text_file),
             "--nsamples", "4", "--seqlen", "64", "--quiet"]
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "gptq"), "--format", "gptq", *flags]) == 0
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True and config["bits"] == 4 and config["group_size"] == 32
    weights = read_checkpoint(tmp_path / "gptq").weights
    assert all(weight.g_idx is not None for weight in weights.values())
    assert main(["convert", str(tmp_path / "gptq"), "-o", str(tmp_path / "ct"), "--format", "compressed-tensors",
                 "--quiet"]) == 0
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "gptq")(TOKENS).logits, load_model(tmp_path / "ct")(TOKENS).logits)


def test_an_autogptq_folder_with_quantize_config_json_inspects_and_converts(tiny_llama, tmp_path, capsys):
    from qtool.cli.app import main

    result = quantize_model(tiny_llama, Recipe(scheme=Scheme(4, 32, True)), scale_dtype=torch.float16)
    tiny_llama.tie_weights()
    folder = tmp_path / "autogptq"
    folder.mkdir()
    write_as_gptq_tools_do(folder, tiny_llama, result, "gptq", False, "quantize_config.json")
    assert main(["inspect", str(folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "gptq" and {layer["scheme"] for layer in summary["layers"]} == {"W4 g32 sym"}
    assert main(["convert", str(folder), "-o", str(tmp_path / "ct"), "--format", "compressed-tensors", "--quiet"]) == 0
    assert not (tmp_path / "ct" / "quantize_config.json").exists()
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "compressed-tensors")

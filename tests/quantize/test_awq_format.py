"""--format awq against AutoAWQ's gemm layout as its description gives it: a decoder written here
reads qtool's tensors back to the weights they stand for, and a checkpoint laid out by hand as
AutoAWQ writes it (w_bit / q_group_size keys, modules_to_not_convert null) loads into the runtime."""

import json

import pytest
import torch

from qtool.quantize.apply import quantize_model
from qtool.quantize.format import read_checkpoint, write_checkpoint
from qtool.quantize.scheme import Override, Recipe, Scheme
from qtool.runtime.loader import load_model

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble j of a word holds output channel 8w + ORDER[j]
TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 81]])


def decode_awq_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out/8] -> [rows, out] 4-bit values, nibble by nibble."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    values = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for j, channel in enumerate(ORDER):
        values[:, channel::8] = (unsigned >> (4 * j)) & 0xF
    return values


def decode_awq_layer(tensors: dict, name: str, group_size: int) -> torch.Tensor:
    """w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o], from the stored tensors alone."""
    q = decode_awq_words(tensors[f"{name}.qweight"])
    zeros = decode_awq_words(tensors[f"{name}.qzeros"]).repeat_interleave(group_size, 0)
    scales = tensors[f"{name}.scales"].float().repeat_interleave(group_size, 0)
    return ((q - zeros) * scales).t()


@pytest.mark.parametrize("scheme", [Scheme(4, 32, False), Scheme(4, 64, True)], ids=lambda s: s.describe())
def test_an_independent_decoder_gives_the_original_dequantized_weights(tiny_llama, tmp_path, scheme):
    from safetensors.torch import load_file

    result = quantize_model(tiny_llama, Recipe(scheme=scheme), scale_dtype=torch.float16)
    write_checkpoint(tmp_path / "awq", tiny_llama, result.weights, result.skipped, "awq", {})
    tensors = load_file(tmp_path / "awq" / "model.safetensors")
    for name, weight in result.weights.items():
        decoded = decode_awq_layer(tensors, name, scheme.group_size)
        assert torch.equal(decoded, weight.dequantize()), name
        original = tiny_llama.get_submodule(name).weight.detach()
        assert ((decoded - original).norm() / original.norm()).item() < 0.15, name


def encode_awq_words(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] 4-bit values -> int32 [rows, out/8], the inverse of the decoder above."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for j, channel in enumerate(ORDER):
        words |= values[:, channel::8].to(torch.int64) << (4 * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_a_checkpoint_laid_out_as_autoawq_writes_it_loads_with_its_weights(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    recipe = Recipe(scheme=Scheme(4, 32, False), overrides=(Override(r"layers\.1\.mlp\.down_proj", None),))
    result = quantize_model(tiny_llama, recipe, scale_dtype=torch.float16)
    tensors = {name: tensor.contiguous() for name, tensor in tiny_llama.state_dict().items()
               if name.removesuffix(".weight") not in result.weights and name != "lm_head.weight"}
    for name, weight in result.weights.items():
        tensors[f"{name}.qweight"] = encode_awq_words(weight.codes().t())
        tensors[f"{name}.qzeros"] = encode_awq_words(weight.zero_points().t())
        tensors[f"{name}.scales"] = weight.scales.t().contiguous()
    folder = tmp_path / "autoawq"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = tiny_llama.config.to_dict()
    config["quantization_config"] = {"quant_method": "awq", "zero_point": True, "q_group_size": 32, "w_bit": 4,
                                     "version": "GEMM", "modules_to_not_convert": None}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = read_checkpoint(folder)
    assert loaded.weights.keys() == result.weights.keys()
    for name, weight in result.weights.items():
        assert torch.equal(loaded.weights[name].dequantize(), weight.dequantize()), name
    write_checkpoint(tmp_path / "ct", tiny_llama, result.weights, result.skipped, "compressed-tensors", {})
    with torch.no_grad():
        assert torch.equal(load_model(folder)(TOKENS).logits, load_model(tmp_path / "ct")(TOKENS).logits)


def test_a_calibrated_awq_run_writes_the_awq_layout(tiny_llama_dir, tiny_text_file, tmp_path):
    """Calibrated runs hold finished layers as placeholders (meta tensors) until the writer reads
    them back; the layout's checks must wait for the real values."""
    from qtool.cli.app import main

    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "awq"), "--method", "awq", "--format", "awq",
                 "--group-size", "32", "--calib", str(tiny_text_file), "--nsamples", "4", "--seqlen", "64", "--quiet"]) == 0
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["version"], config["group_size"]) == ("awq", "gemm", 32)
    assert len(read_checkpoint(tmp_path / "awq").weights) == 14

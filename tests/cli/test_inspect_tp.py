"""qtool inspect --tp N: per-rank shapes, the tensor-parallel rules of vLLM each layer breaks, and
the vLLM kernel each layer would get on Hopper (sm90) and Ampere/Ada (sm80)."""

import json

import pytest
import torch

from qtool.cli.app import main
from qtool.quantize.apply import quantize_model
from qtool.quantize.format import write_checkpoint
from qtool.quantize.scheme import Override, Recipe, Scheme


@pytest.fixture(scope="module")
def llama_256():
    """One block with Llama-shaped linears large enough for vLLM's kernels: q/o 256x256, k/v 128x256,
    gate/up 512x256, down 256x512 (head dim 64, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    return LlamaForCausalLM(config).eval()


def checkpoint(model, folder, recipe, fmt="compressed-tensors"):
    result = quantize_model(model, recipe, scale_dtype=torch.float16)
    write_checkpoint(folder, model, result.weights, result.skipped, fmt, {})
    return folder


def inspect(capsys, folder, tp, *extra):
    capsys.readouterr()
    code = main(["inspect", str(folder), "--tp", str(tp), "--json", *extra])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    return {layer["name"].removeprefix("model.layers.0."): layer["vllm"] for layer in data["layers"]}


def kernels(layers, name):
    return layers[name]["kernels"]["sm90"], layers[name]["kernels"]["sm80"]


def test_shapes_that_split_cleanly_get_machete_and_marlin(llama_256, tmp_path, capsys):
    folder = checkpoint(llama_256, tmp_path / "ct", Recipe(scheme=Scheme(4, 64, True)))
    layers = inspect(capsys, folder, 1)
    assert {kernels(layers, name) for name in layers} == {("Machete", "Marlin")}
    assert all(layer["warnings"] == [] for layer in layers.values())
    layers = inspect(capsys, folder, 2)
    assert layers["self_attn.o_proj"]["parallel"] == "row" and layers["self_attn.o_proj"]["rank_shape"] == [256, 128]
    assert layers["self_attn.k_proj"]["parallel"] == "column" and layers["self_attn.k_proj"]["rank_shape"] == [64, 256]
    assert kernels(layers, "self_attn.k_proj") == ("Marlin", "Marlin")  # Machete wants 128 output features a rank
    assert all(layer["warnings"] == [] for layer in layers.values())


def test_splits_that_break_marlin_are_named_and_fall_back(llama_256, tmp_path, capsys):
    folder = checkpoint(llama_256, tmp_path / "ct", Recipe(scheme=Scheme(4, 64, True)))
    layers = inspect(capsys, folder, 4)
    assert layers["self_attn.k_proj"]["warnings"] == ["32 output features per rank are not a multiple of 64 (Marlin)"]
    assert kernels(layers, "self_attn.k_proj") == ("Exllama (fp16)", "Exllama (fp16)")
    assert layers["self_attn.o_proj"]["warnings"] == ["64 input features per rank are not a multiple of 128 (Marlin)"]
    assert kernels(layers, "self_attn.o_proj") == ("Machete", "Exllama (fp16)")
    layers = inspect(capsys, folder, 8)
    assert layers["self_attn.o_proj"]["warnings"][0] == (
        "32 input features per rank are not a multiple of the group size 64")
    layers = inspect(capsys, folder, 3)
    assert layers["self_attn.q_proj"]["warnings"][0] == "256 output features do not split into 3 ranks"
    assert layers["mlp.down_proj"]["warnings"][0] == "512 input features do not split into 3 ranks"


def test_layers_no_vllm_kernel_runs_are_warned_about(llama_256, tmp_path, capsys):
    asym = checkpoint(llama_256, tmp_path / "asym", Recipe(scheme=Scheme(4, 64, False)))
    layers = inspect(capsys, asym, 4)
    assert kernels(layers, "self_attn.k_proj") == ("none", "none")  # Exllama has no zero points
    assert layers["self_attn.k_proj"]["warnings"][-2:] == ["no vLLM kernel runs it on sm90", "no vLLM kernel runs it on sm80"]
    w3 = checkpoint(llama_256, tmp_path / "w3", Recipe(scheme=Scheme(3, 64, True)))
    assert kernels(inspect(capsys, w3, 1), "mlp.up_proj") == ("none", "none")


def test_each_format_gets_the_kernels_vllm_has_for_it(llama_256, tmp_path, capsys):
    w8_asym = checkpoint(llama_256, tmp_path / "w8", Recipe(scheme=Scheme(8, -1, False)))
    assert kernels(inspect(capsys, w8_asym, 2), "mlp.down_proj") == ("Machete", "Marlin")  # zero points: uint8
    gptq_w4 = checkpoint(llama_256, tmp_path / "gptq4", Recipe(scheme=Scheme(4, 64, True)), "gptq")
    assert kernels(inspect(capsys, gptq_w4, 1), "mlp.up_proj") == ("Machete", "Marlin")
    gptq_w3 = checkpoint(llama_256, tmp_path / "gptq3", Recipe(scheme=Scheme(3, 64, False)), "gptq")
    assert kernels(inspect(capsys, gptq_w3, 1), "mlp.up_proj") == ("GPTQ exllama (gptq_gemm)",) * 2
    awq = checkpoint(llama_256, tmp_path / "awq", Recipe(scheme=Scheme(4, 64, False)), "awq")
    layers = inspect(capsys, awq, 4)
    assert kernels(layers, "mlp.up_proj") == ("Marlin", "Marlin")
    assert kernels(layers, "self_attn.k_proj") == ("AWQ gemm", "AWQ gemm")
    native = checkpoint(llama_256, tmp_path / "qtool", Recipe(scheme=Scheme(4, 64, False)), "qtool")
    assert kernels(inspect(capsys, native, 1), "mlp.up_proj") == ("none", "none")


FUSED_WARNING = "vLLM fuses it into qkv_proj, whose parts have different schemes (or are not all quantized)"


def test_fused_layers_with_different_schemes_are_warned_about(llama_256, tmp_path, capsys):
    recipe = Recipe(scheme=Scheme(4, 64, True), overrides=(Override("k_proj", Scheme(8, -1, True)),))
    layers = inspect(capsys, checkpoint(llama_256, tmp_path / "mixed", recipe), 1)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert layers[name]["warnings"] == [FUSED_WARNING]
    assert layers["mlp.up_proj"]["warnings"] == []
    recipe = Recipe(scheme=Scheme(4, 64, True), overrides=(Override("gate_proj", None),))
    layers = inspect(capsys, checkpoint(llama_256, tmp_path / "skip", recipe, "gptq"), 1)
    assert layers["mlp.up_proj"]["warnings"] == [FUSED_WARNING.replace("qkv_proj", "gate_up_proj")]
    assert layers["self_attn.q_proj"]["warnings"] == []


def test_the_table_lists_kernels_and_warnings(llama_256, tmp_path, capsys):
    folder = checkpoint(llama_256, tmp_path / "ct", Recipe(scheme=Scheme(4, 64, True)))
    capsys.readouterr()
    assert main(["inspect", str(folder), "--tp", "4"]) == 0
    out = capsys.readouterr().out
    assert "kernel sm90" in out and "Machete" in out and "256x64 row" in out
    assert ("warning: model.layers.0.self_attn.o_proj: 64 input features per rank are not a multiple of 128 "
            "(Marlin)") in out


def test_bad_tp_values_are_refused(llama_256, tiny_llama_dir, tmp_path, capsys):
    folder = checkpoint(llama_256, tmp_path / "ct", Recipe())
    assert main(["inspect", str(folder), "--tp", "0"]) == 2
    assert capsys.readouterr().err == "qtool: error: --tp must be a positive number of GPUs, got 0\n"
    assert main(["inspect", str(tiny_llama_dir), "--tp", "2"]) == 2
    assert capsys.readouterr().err == (
        "qtool: error: --tp checks quantized checkpoints; this folder has no quantization_config\n")

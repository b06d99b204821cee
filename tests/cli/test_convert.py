"""qtool convert: checkpoints rewritten between formats with every weight unchanged, and refused,
with the reason and exit code 2 and no folder left behind, where a format cannot hold them."""

import json
import shutil

import pytest
import torch

from qtool.cli.app import main
from qtool.quantize.apply import quantize_model
from qtool.quantize.format import read_checkpoint, write_checkpoint
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Override, Recipe, Scheme
from qtool.runtime.loader import load_model

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 81]])
FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "llmcompressor"


@pytest.fixture(scope="module")
def fp16_llama(tiny_llama_dir):
    return load_model(tiny_llama_dir, dtype=None)  # float16, as stored


def checkpoint(model, folder, recipe, fmt="compressed-tensors", transform=None):
    result = quantize_model(model, recipe, scale_dtype=torch.float16)
    weights = transform(result.weights) if transform else result.weights
    write_checkpoint(folder, model, weights, result.skipped, fmt, {"recipe": recipe.to_dict()})
    return weights


def convert(source, output, fmt, *extra):
    return main(["convert", str(source), "-o", str(output), "--format", fmt, "--quiet", *extra])


def assert_same_weights(folder, weights, exact_scheme=True):
    back = read_checkpoint(folder).weights
    assert back.keys() == weights.keys()
    for name, weight in weights.items():
        assert torch.equal(back[name].packed, weight.packed) and torch.equal(back[name].scales, weight.scales), name
        assert torch.equal(back[name].zero_points(), weight.zero_points()), name
        assert not exact_scheme or back[name].scheme == weight.scheme, name


@pytest.mark.parametrize("recipe, chain", [
    (Recipe(scheme=Scheme(4, 32, False)), ["gptq", "awq", "qtool", "compressed-tensors"]),
    (Recipe(scheme=Scheme(8, -1, True), overrides=(Override("mlp", Scheme(3, 32, False)), Override(r"1\.self_attn\.o", None))),
     ["gptq", "qtool", "compressed-tensors"]),
], ids=["w4g32-asym-all-formats", "mixed-w8-w3-skip"])
def test_a_chain_of_conversions_keeps_every_weight_and_the_logits(fp16_llama, tiny_llama_dir, tmp_path, recipe, chain):
    weights = checkpoint(fp16_llama, tmp_path / "start", recipe)
    shutil.copyfile(tiny_llama_dir / "tokenizer.json", tmp_path / "start" / "tokenizer.json")
    source = tmp_path / "start"
    for step, fmt in enumerate(chain):
        output = tmp_path / f"{step}-{fmt}"
        assert convert(source, output, fmt) == 0
        config = json.loads((output / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == {"qtool": "qtool"}.get(fmt, fmt)
        assert_same_weights(output, weights)
        source = output
    assert (source / "tokenizer.json").read_bytes() == (tmp_path / "start" / "tokenizer.json").read_bytes()
    assert json.loads((source / "qtool.json").read_text())["converted"]["format"] == "compressed-tensors"
    assert (source / "model.safetensors").read_bytes() == (tmp_path / "start" / "model.safetensors").read_bytes()
    assert read_checkpoint(source).config["quantization_config"] == read_checkpoint(tmp_path / "start").config[
        "quantization_config"]
    with torch.no_grad():
        assert torch.equal(load_model(source)(TOKENS).logits, load_model(tmp_path / "start")(TOKENS).logits)


def test_an_llm_compressor_act_order_checkpoint_converts_to_gptq_with_its_logits(tmp_path):
    assert convert(FIXTURES / "gptq_group_actorder", tmp_path / "gptq", "gptq") == 0
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True and config["sym"] is True
    original = read_checkpoint(FIXTURES / "gptq_group_actorder").weights
    assert_same_weights(tmp_path / "gptq", original)
    assert any(weight.g_idx is not None for weight in read_checkpoint(tmp_path / "gptq").weights.values())
    with torch.no_grad():
        ours = load_model(tmp_path / "gptq")(TOKENS).logits
        assert torch.equal(ours, load_model(FIXTURES / "gptq_group_actorder")(TOKENS).logits)


def with_act_order(weights):
    return {name: QuantizedWeight(w.packed, w.scales, w.zeros, w.scheme, w.shape,
                                  torch.randperm(w.in_features).remainder(w.scheme.group_count(w.in_features)).int())
            for name, w in weights.items()}


def with_tables(weights):
    return {name: QuantizedWeight(w.packed, None, None, Scheme(4, -1, lut=True), w.shape,
                                  lut=torch.randn(w.out_features, 1, 16).half()) for name, w in weights.items()}


REFUSALS = {
    "act-order-into-awq": (Recipe(scheme=Scheme(4, 32, False)), "compressed-tensors", with_act_order, "awq",
                           "cannot convert to awq without changing the weights: model.layers.0.mlp.down_proj: act-order "
                           "groups (g_idx) do not fit --format awq; use --format gptq or compressed-tensors"),
    "tables-into-gptq": (Recipe(scheme=Scheme(4, 32, False)), "qtool", with_tables, "gptq",
                         "cannot convert to gptq without changing the weights: model.layers.0.mlp.down_proj: look-up "
                         "tables and sparse outliers do not fit --format gptq; use --format qtool"),
    "tables-into-compressed-tensors": (Recipe(scheme=Scheme(4, 32, False)), "qtool", with_tables, "compressed-tensors",
                                       "cannot convert to compressed-tensors without changing the weights: "
                                       "model.layers.0.mlp.down_proj: look-up tables and sparse outliers do not fit "
                                       "--format compressed-tensors; use --format qtool"),
    "w3-into-awq": (Recipe(scheme=Scheme(3, 32, False)), "compressed-tensors", None, "awq",
                    "cannot convert to awq without changing the weights: model.layers.0.mlp.down_proj: W3 g32 asym does "
                    "not fit --format awq (4 bits with a group size); use --format compressed-tensors"),
    "two-group-sizes-into-awq": (Recipe(scheme=Scheme(4, 32, False), overrides=(Override("mlp", Scheme(4, 64, False)),)),
                                 "compressed-tensors", None, "awq",
                                 "cannot convert to awq: --format awq has one group size per model; the layers use [32, 64]"),
    "w5-into-gptq": (Recipe(scheme=Scheme(5, 32, True)), "compressed-tensors", None, "gptq",
                     "cannot convert to gptq without changing the weights: model.layers.0.mlp.down_proj: W5 g32 sym does "
                     "not fit --format gptq (2, 3, 4 or 8 bits); use --format compressed-tensors"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_what_a_format_cannot_hold_is_refused_with_the_reason(fp16_llama, tmp_path, capsys, case):
    recipe, source_format, transform, target, message = REFUSALS[case]
    checkpoint(fp16_llama, tmp_path / "source", recipe, source_format, transform)
    capsys.readouterr()
    assert convert(tmp_path / "source", tmp_path / "out", target) == 2
    assert capsys.readouterr().err == f"qtool: error: {message}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_scales_the_target_would_round_are_refused(tiny_llama, tmp_path, capsys):
    result = quantize_model(tiny_llama, Recipe(scheme=Scheme(4, 32, True)))  # float32 scales
    write_checkpoint(tmp_path / "source", tiny_llama, result.weights, result.skipped, "compressed-tensors", {})
    assert convert(tmp_path / "source", tmp_path / "out", "gptq") == 2
    assert capsys.readouterr().err == (
        "qtool: error: cannot convert to gptq without changing the weights: model.layers.0.mlp.down_proj: its float32 "
        "scales do not fit float16, which the target format stores them in\n")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_one_line_errors(fp16_llama, tiny_llama_dir, tmp_path, capsys):
    checkpoint(fp16_llama, tmp_path / "ckpt", Recipe())
    (tmp_path / "taken").mkdir()
    cases = [
        ((tmp_path / "missing", tmp_path / "o", "gptq"), f"{tmp_path / 'missing'} is not a checkpoint folder: it has no config.json"),
        ((tiny_llama_dir, tmp_path / "o", "gptq"), f"{tiny_llama_dir} is not a quantized checkpoint (its config.json "
                                                   f"has no quantization_config); make one with qtool quantize"),
        ((tmp_path / "ckpt", tmp_path / "o", "onnx"), "unknown checkpoint format 'onnx'; choose one of: awq, "
                                                      "compressed-tensors, gptq, qtool"),
        ((tmp_path / "ckpt", tmp_path / "ckpt", "gptq"), f"convert writes a new folder; choose an -o other than {tmp_path / 'ckpt'}"),
        ((tmp_path / "ckpt", tmp_path / "taken", "gptq"), f"output folder {tmp_path / 'taken'} already exists; choose "
                                                          f"another -o or pass --overwrite"),
    ]
    for arguments, message in cases:
        capsys.readouterr()
        assert convert(*arguments) == 2
        assert capsys.readouterr().err == f"qtool: error: {message}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt", "taken"]
    assert convert(tmp_path / "ckpt", tmp_path / "taken", "gptq", "--overwrite") == 0


def test_json_output_says_what_was_converted(fp16_llama, tmp_path, capsys):
    checkpoint(fp16_llama, tmp_path / "ckpt", Recipe())
    capsys.readouterr()
    assert convert(tmp_path / "ckpt", tmp_path / "out", "gptq", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "checkpoint": str(tmp_path / "ckpt"), "output": str(tmp_path / "out"), "from": "compressed-tensors",
        "to": "gptq", "quantized_layers": 14}

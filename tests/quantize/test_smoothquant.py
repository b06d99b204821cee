"""SmoothQuant and W8A8: folding keeps the function, smoothing lowers the int8 error where
activations have outlier channels, and the int8 product is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_awq import correlated, tiny

from qtool.calibrate.pipeline import calibrate_sequentially
from qtool.cli.app import main
from qtool.errors import QtoolError
from qtool.kernels.int8_matmul import quantize_per_token, reference
from qtool.quantize.apply import plan_layers
from qtool.quantize.grid import fit_minmax, quantize_to_codes
from qtool.quantize.scheme import Recipe, Scheme, SmoothQuantOptions
from qtool.calibrate.stats import ChannelSampleStat
from qtool.quantize.smoothquant import ALPHA_GRID, int8_product_error, search_alpha, smooth_block, smoothing_scales
from qtool.quantize.format import read_checkpoint
from qtool.runtime.loader import load_model

W8A8 = Scheme(8, -1, True, activation_bits=8)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2", "opt"])
def test_folding_smoothquant_scales_leaves_the_logits_unchanged(family):
    model = tiny(family)
    samples = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(samples).logits
    recipe = Recipe(method="smoothquant", scheme=W8A8)
    plan = plan_layers(model, recipe)
    calibrate_sequentially(model, samples, lambda run: smooth_block(run, plan, recipe, None))
    with torch.no_grad():
        after = model(samples).logits
    assert (after - before).abs().max() < 1e-4


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grid = fit_minmax(weight, Scheme(8, -1, True), torch.float32)
    return (quantize_to_codes(weight, grid, Scheme(8, -1, True)) - 128).to(torch.int8), grid.scales[:, 0]


def w8a8_error(inputs: torch.Tensor, weight: torch.Tensor) -> float:
    codes, scales = int8_weight(weight)
    exact = inputs @ weight.t()
    return ((reference(inputs, codes, scales) - exact).norm() / exact.norm()).item()


def test_smoothing_moves_outlier_channels_into_the_weights_and_lowers_the_w8a8_error():
    torch.manual_seed(0)
    inputs = correlated(rows=512, features=128)
    inputs[:, :4] *= 10  # SmoothQuant's setting: a few channels far larger than the rest
    weight = torch.randn(96, 128) * 0.05
    scales = smoothing_scales(inputs.abs().amax(dim=0), weight, alpha=0.8)
    smoothed_inputs, smoothed_weight = inputs / scales, weight * scales
    torch.testing.assert_close(smoothed_inputs @ smoothed_weight.t(), inputs @ weight.t(), rtol=1e-4, atol=1e-3)
    assert w8a8_error(smoothed_inputs, smoothed_weight) < 0.5 * w8a8_error(inputs, weight)
    # alpha = 0 leaves the activations' range where it was, 1 flattens it
    flat = inputs / smoothing_scales(inputs.abs().amax(dim=0), weight, alpha=1.0)
    assert flat.abs().amax(dim=0).max() == pytest.approx(1.0, rel=1e-5)


def test_the_int8_product_is_exact_integer_arithmetic_then_the_scales():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64)
    weight, weight_scales = torch.randint(-127, 128, (48, 64), dtype=torch.int8), torch.rand(48) + 0.5
    codes, scales = quantize_per_token(x)
    assert codes.dtype == torch.int8 and codes.abs().amax(dim=1).eq(127).all()
    torch.testing.assert_close(codes.float() * scales, x.reshape(-1, 64), atol=scales.max().item() / 2, rtol=0)
    integer = codes.int() @ weight.int().t()  # int32 products and sums, exact
    expected = (integer.float() * scales * weight_scales).reshape(5, 3, 48)
    torch.testing.assert_close(reference(x, weight, weight_scales), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme_args, message", [
    ((4, 64, False, False, 8), "8-bit activations (W8A8) go with 8-bit symmetric per-channel weights: --bits 8 --group-size -1 --sym"),
    ((8, -1, True, False, 4), "activation bits must be 8 (int8 per token) or left out, got 4"),
])
def test_impossible_activation_schemes_are_refused(scheme_args, message):
    with pytest.raises(QtoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Scheme(*scheme_args)
    with pytest.raises(QtoolError, match="SmoothQuant alpha must be a number from 0 to 1 or auto, got 1.5"):
        SmoothQuantOptions(alpha=1.5)


def test_smoothquant_writes_w8a8_compressed_tensors_that_load_and_run_with_int8_activations(
        tiny_llama_dir, tmp_path, calibration_flags, capsys):
    out = tmp_path / "sq"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "smoothquant", "--alpha", "0.5",
                 *calibration_flags]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()  # vLLM's INT8_W8A8: int8 channel weights, dynamic int8 tokens
    assert config["format"] == group["format"] == "int-quantized"
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                          "dynamic": True}
    assert json.loads((out / "qtool.json").read_text())["recipe"]["smoothquant"] == {"alpha": 0.5}
    stored = load_file(out / "model.safetensors")
    checkpoint = read_checkpoint(out)
    for name, weight in checkpoint.weights.items():  # the layout decoded as published: int8 times the row's scale
        assert weight.scheme == W8A8 and stored[f"{name}.weight"].dtype == torch.int8
        decoded = stored[f"{name}.weight"].float() * stored[f"{name}.weight_scale"].float()
        torch.testing.assert_close(decoded, weight.dequantize(), rtol=0, atol=0)
    model, original = load_model(out), load_model(tiny_llama_dir, torch.float32)
    tokens = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        got, want = model(tokens).logits, original(tokens).logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    capsys.readouterr()
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "gptq"), "--method", "smoothquant",
                 "--format", "gptq", *calibration_flags]) == 2
    assert ("8-bit activations (W8A8) are written in compressed-tensors (int-quantized) or qtool's format; "
            "use --format compressed-tensors") in capsys.readouterr().err


def test_the_alpha_search_takes_the_strength_with_the_least_int8_error():
    """Outliers in a few channels: no smoothing (alpha 0) loses to some; the search picks the grid
    point whose int8 product errs least on the sampled tokens, which also beats the fixed 0.8."""
    torch.manual_seed(0)
    inputs = correlated(rows=512, features=128)
    inputs[:, :4] *= 30
    weight = torch.randn(96, 128) * 0.05
    stat = ChannelSampleStat(128, stride=2)
    stat.update(inputs)
    assert stat.sample().shape == (256, 128) and torch.equal(stat.sample(), inputs[::2])
    scheme = Scheme(8, -1, True, activation_bits=8)
    scales, alpha = search_alpha(stat, weight, scheme, torch.float32)
    errors = {step / ALPHA_GRID: int8_product_error(stat.sample(), weight, smoothing_scales(stat.max_abs, weight, step / ALPHA_GRID),
                                                    scheme, torch.float32) for step in range(ALPHA_GRID + 1)}
    assert errors[alpha] == min(errors.values()) and errors[alpha] < 0.5 * errors[0.0]
    assert torch.equal(scales, smoothing_scales(stat.max_abs, weight, alpha))


def test_auto_alpha_runs_from_the_command_line_and_is_recorded(tiny_llama_dir, tmp_path, calibration_flags, capsys):
    out = tmp_path / "sq-auto"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "smoothquant", "--alpha", "auto",
                 *calibration_flags]) == 0
    assert json.loads((out / "qtool.json").read_text())["recipe"]["smoothquant"] == {"alpha": "auto"}
    capsys.readouterr()
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "never"), "--method", "smoothquant",
                 "--alpha", "strong"]) == 2
    assert "--alpha must be a number from 0 to 1 or auto, got 'strong'" in capsys.readouterr().err

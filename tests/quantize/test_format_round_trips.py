"""Every format round-trips every scheme it holds bit for bit: qtool -> format -> qtool gives the
same codes, scales, zero points, g_idx, look-up tables and outliers (AWQ stores symmetric grids
with their zero point, so they come back as the same numbers with an explicit zero point)."""

import pytest
import torch

from qtool.quantize.apply import quantize_model
from qtool.quantize.format import read_checkpoint, write_checkpoint
from qtool.quantize.qweight import QuantizedWeight, SparseOutliers
from qtool.quantize.scheme import Override, Recipe, Scheme

GROUPS = (32, -1)
HOLDS = {  # format -> the uniform schemes it holds
    "compressed-tensors": [Scheme(b, g, s) for b in range(2, 9) for g in GROUPS for s in (True, False)]
                          + [Scheme(8, -1, True, activation_bits=8)],
    "gptq": [Scheme(b, g, s) for b in (2, 3, 4, 8) for g in GROUPS for s in (True, False)],
    "awq": [Scheme(4, 32, s) for s in (True, False)],
    "qtool": [Scheme(b, g, s) for b in range(2, 9) for g in GROUPS for s in (True, False)]
             + [Scheme(8, -1, True, activation_bits=8)],
}
ACT_ORDER = ("compressed-tensors", "gptq", "qtool")
MIXED = {
    "awq": (Override("mlp", Scheme(4, 32, True)), Override(r"layers\.1\.self_attn\.o_proj", None)),
    "gptq": (Override("mlp", Scheme(8, -1, True)), Override(r"layers\.0\.self_attn\.v", Scheme(3, 32, True)),
              Override(r"layers\.1\.self_attn\.o_proj", None)),
    "other": (Override("mlp", Scheme(8, -1, True, activation_bits=8)),
              Override(r"layers\.0\.self_attn\.v", Scheme(3, 32, True)), Override(r"layers\.1\.self_attn\.o_proj", None)),
}


def assert_round_trip(model, folder, fmt, weights, skipped):
    write_checkpoint(folder, model, weights, skipped, fmt, {})
    back = read_checkpoint(folder)
    assert back.weights.keys() == weights.keys()
    assert {f"{name}.weight" for name in skipped if name != "lm_head"} <= back.dense.keys()
    for name, weight in weights.items():
        got = back.weights[name]
        assert got.shape == weight.shape and got.scheme.bits == weight.scheme.bits, name
        assert got.scheme == weight.scheme or (fmt == "awq" and weight.scheme.symmetric), name
        assert torch.equal(got.packed, weight.packed), name
        for field in ("scales", "g_idx", "lut"):
            mine, theirs = getattr(weight, field), getattr(got, field)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), (name, field)
        if weight.scales is not None:
            assert torch.equal(got.zero_points(), weight.zero_points()), name
        assert (weight.outliers is None) == (got.outliers is None), name
        if weight.outliers is not None:
            for field in ("values", "columns", "row_offsets"):
                assert torch.equal(getattr(got.outliers, field), getattr(weight.outliers, field)), (name, field)


def quantized(model, recipe):
    return quantize_model(model, recipe, scale_dtype=torch.float16)


@pytest.mark.parametrize("fmt, scheme", [(fmt, scheme) for fmt, schemes in HOLDS.items() for scheme in schemes],
                         ids=lambda value: value.describe() if isinstance(value, Scheme) else value)
def test_every_scheme_a_format_holds_round_trips(tiny_llama, tmp_path, fmt, scheme):
    result = quantized(tiny_llama, Recipe(scheme=scheme))
    assert_round_trip(tiny_llama, tmp_path / "ckpt", fmt, result.weights, result.skipped)


@pytest.mark.parametrize("fmt", ACT_ORDER)
def test_act_order_groups_round_trip(tiny_llama, tmp_path, fmt):
    result = quantized(tiny_llama, Recipe(scheme=Scheme(4, 32, False)))
    weights = {name: QuantizedWeight(w.packed, w.scales, w.zeros, w.scheme, w.shape,
                                     torch.randperm(w.in_features).remainder(w.in_features // 32).int())
               for name, w in result.weights.items()}
    assert_round_trip(tiny_llama, tmp_path / "ckpt", fmt, weights, result.skipped)


@pytest.mark.parametrize("fmt", list(HOLDS))
def test_mixed_schemes_and_skipped_layers_round_trip(tiny_llama, tmp_path, fmt):
    recipe = Recipe(scheme=Scheme(4, 32, False), overrides=MIXED.get(fmt, MIXED["other"]))
    result = quantized(tiny_llama, recipe)
    assert "model.layers.1.self_attn.o_proj" in result.skipped
    assert_round_trip(tiny_llama, tmp_path / "ckpt", fmt, result.weights, result.skipped)


def test_look_up_tables_with_outliers_round_trip_in_qtools_format(tiny_llama, tmp_path):
    result = quantized(tiny_llama, Recipe(scheme=Scheme(3, 32, False)))
    weights = {}
    for name, w in result.weights.items():
        mask = torch.rand(w.shape) < 0.01
        outliers = SparseOutliers.from_dense(torch.randn(w.shape).half(), mask)
        groups = 1 if name.endswith("up_proj") else w.in_features // 32  # a table per row, or per row and group
        lut = torch.randn(w.out_features, groups, 8).half()
        scheme = Scheme(3, -1 if groups == 1 else 32, lut=True)
        weights[name] = QuantizedWeight(w.packed, None, None, scheme, w.shape, lut=lut, outliers=outliers)
    assert_round_trip(tiny_llama, tmp_path / "ckpt", "qtool", weights, result.skipped)

import pytest
import torch

from qtool.quantize.grid import dequantize_codes, fit_minmax, fit_mse, quantize_to_codes
from qtool.quantize.scheme import Scheme

SCHEMES = [Scheme(bits, group, sym) for bits in (2, 3, 4, 8) for group in (16, -1) for sym in (True, False)]


def assert_nearest(weight, grid, scheme, codes):
    """Every code's value is as near its weight as the nearest of all 2**bits values, tried one by
    one (up to float rounding of exact ties)."""
    levels = torch.arange(2**scheme.bits, dtype=torch.float64)
    size = weight.shape[1] if scheme.group_size == -1 else scheme.group_size
    scales = grid.scales.double().repeat_interleave(size, dim=1)
    zeros = grid.zeros.double().repeat_interleave(size, dim=1)
    distances = ((levels.view(1, 1, -1) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1) - weight.double().unsqueeze(-1)).abs()
    best = distances.min(dim=-1).values
    chosen = distances.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert (chosen <= best + 1e-4 * scales).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_codes_are_the_nearest_grid_point(scheme):
    weight = torch.randn(8, 64)
    grid = fit_minmax(weight, scheme, torch.float32)
    assert_nearest(weight, grid, scheme, quantize_to_codes(weight, grid, scheme))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(scheme):
    weight = torch.randn(8, 64)
    grid = fit_minmax(weight, scheme, torch.float32)
    restored = dequantize_codes(quantize_to_codes(weight, grid, scheme), grid.scales, grid.zeros, scheme.group_size)
    size = 64 if scheme.group_size == -1 else scheme.group_size
    half_step = grid.scales.repeat_interleave(size, dim=1) / 2
    # a symmetric grid has one level more below zero than above, so +max|w| may clip by half a step
    slack = half_step * (2 if scheme.symmetric else 1)
    assert ((weight - restored).abs() <= slack + 1e-6).all()


def test_asymmetric_grid_represents_the_group_extremes_and_zero():
    weight = torch.tensor([[-1.0, 0.5, 3.0, 2.0]])
    grid = fit_minmax(weight, Scheme(4, -1, False), torch.float32)
    assert grid.scales.item() == pytest.approx(4.0 / 15)
    restored = dequantize_codes(quantize_to_codes(weight, grid, Scheme(4, -1, False)), grid.scales, grid.zeros, -1)
    assert restored[0, 2].item() == pytest.approx(3.0, abs=grid.scales.item() / 2)
    assert restored[0, 0].item() == pytest.approx(-1.0, abs=grid.scales.item() / 2)


def test_symmetric_grid_is_centred_with_the_implied_zero():
    weight = torch.tensor([[-2.0, 1.0, 0.0, 0.5]])
    grid = fit_minmax(weight, Scheme(4, -1, True), torch.float32)
    assert grid.zeros.item() == 8
    assert grid.scales.item() == pytest.approx(2.0 / 7.5)


def test_all_zero_group_gets_a_usable_scale_and_restores_zeros():
    weight = torch.zeros(2, 32)
    for symmetric in (True, False):
        scheme = Scheme(4, 16, symmetric)
        grid = fit_minmax(weight, scheme, torch.float16)
        assert (grid.scales > 0).all()
        restored = dequantize_codes(quantize_to_codes(weight, grid, scheme), grid.scales, grid.zeros, 16)
        assert torch.equal(restored, weight)


def test_codes_agree_with_the_stored_low_precision_scales():
    weight = torch.randn(4, 64, dtype=torch.float16)
    scheme = Scheme(4, 32, False)
    grid = fit_minmax(weight, scheme, torch.float16)
    assert grid.scales.dtype == torch.float16
    assert_nearest(weight, grid, scheme, quantize_to_codes(weight, grid, scheme))


@pytest.mark.parametrize("symmetric", [True, False])
def test_searched_grids_round_with_less_error_than_min_max(symmetric):
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((64, 256))  # heavy tails: outliers worth clipping
    scheme = Scheme(4, 64, symmetric)

    def group_error(grid):
        restored = dequantize_codes(quantize_to_codes(weight, grid, scheme), grid.scales, grid.zeros, 64)
        return (restored - weight).abs().pow(2.4).reshape(64, 4, 64).sum(-1)

    minmax, searched = group_error(fit_minmax(weight, scheme, torch.float32)), group_error(fit_mse(weight, scheme, torch.float32))
    assert (searched <= minmax * (1 + 1e-6)).all()
    assert searched.sum() < 0.95 * minmax.sum()

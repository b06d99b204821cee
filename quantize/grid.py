"""Uniform integer grids: one scale (and zero point) per group of input columns.

A weight w in group g of row r is stored as the code q = clamp(round(w / s) + z, 0, 2**bits - 1)
and read back as (q - z) * s, with s = scales[r, g] and z = zeros[r, g]. Symmetric grids fix
z = 2**(bits-1) and s = max|w| / ((2**bits - 1) / 2), so the grid is centred on zero;
asymmetric grids span [min(w, 0), max(w, 0)] with a rounded integer zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.quantize.scheme import Scheme


@dataclass(frozen=True)
class Grid:
    """Per-group scales (in the dtype they are stored in) and integer zero points, both [out, n_groups]."""

    scales: torch.Tensor
    zeros: torch.Tensor


def max_code(bits: int) -> int:
    return 2**bits - 1


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [out, in] as [out, n_groups, group_size]; per-channel is one group of all columns."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    return weight.reshape(out_features, in_features // size, size)


MSE_STEPS, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4  # the search of GPTQ's reference code


def fit_grid(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, mse: bool = False) -> Grid:
    """The min-max grid of each group, or with `mse` the searched one (`fit_mse`)."""
    return fit_mse(weight, scheme, scale_dtype) if mse else fit_minmax(weight, scheme, scale_dtype)


def fit_minmax(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype) -> Grid:
    """The min-max grid of each group. Scales are rounded to `scale_dtype` before zeros are chosen,
    so codes and stored scales agree exactly."""
    return _range_grid(grouped(weight.float(), scheme.group_size), scheme, scale_dtype, shrink=1.0)


def fit_mse(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype) -> Grid:
    """For each group, the grid of its min-max range shrunk by 0%, 1%, ... up to 80% that rounds
    the group with the least sum of |error|^2.4: clipping a few outliers buys finer steps for
    the rest. A fixed sequence of tensor operations (no host synchronisation)."""
    groups = grouped(weight.float(), scheme.group_size)
    best = _range_grid(groups, scheme, scale_dtype, shrink=1.0)
    best_error = _rounding_error(groups, best, scheme.bits)
    for step in range(1, int(MSE_MAX_SHRINK * MSE_STEPS)):
        grid = _range_grid(groups, scheme, scale_dtype, shrink=1 - step / MSE_STEPS)
        error = _rounding_error(groups, grid, scheme.bits)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = Grid(torch.where(better, grid.scales, best.scales), torch.where(better, grid.zeros, best.zeros))
    return best


def _range_grid(groups: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, shrink: float) -> Grid:
    """The grid spanning each group's range [out, n_groups, size] scaled by `shrink`."""
    top = max_code(scheme.bits)
    if scheme.symmetric:
        scales = groups.abs().amax(dim=-1) * (shrink / (top / 2))
    else:
        low = groups.amin(dim=-1).clamp(max=0) * shrink
        high = groups.amax(dim=-1).clamp(min=0) * shrink
        scales = (high - low) / top
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).to(scale_dtype)
    if scheme.symmetric:
        zeros = torch.full_like(scales, 2 ** (scheme.bits - 1), dtype=torch.int32)
    else:
        zeros = torch.round(-low / scales.float()).clamp(0, top).to(torch.int32)
    return Grid(scales=scales, zeros=zeros)


def _rounding_error(groups: torch.Tensor, grid: Grid, bits: int) -> torch.Tensor:
    scales, zeros = grid.scales.float().unsqueeze(-1), grid.zeros.unsqueeze(-1)
    restored = (round_to_grid(groups, scales, zeros, bits) - zeros).float() * scales
    return (restored - groups).abs().pow(MSE_NORM).sum(dim=-1)


def round_to_grid(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `values` on grids whose scales and zeros broadcast against them."""
    codes = torch.round(values.float() / scales.float()) + zeros
    return codes.clamp(0, max_code(bits)).to(torch.int32)


def quantize_to_codes(weight: torch.Tensor, grid: Grid, scheme: Scheme) -> torch.Tensor:
    """Integer codes [out, in] of `weight` on `grid`."""
    groups = grouped(weight, scheme.group_size)
    codes = round_to_grid(groups, grid.scales.unsqueeze(-1), grid.zeros.unsqueeze(-1), scheme.bits)
    return codes.reshape(weight.shape)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - z) * s in float32, for codes [out, in] with contiguous groups of `group_size` columns."""
    groups = grouped(codes, group_size)
    return ((groups - zeros.unsqueeze(-1)).float() * scales.float().unsqueeze(-1)).reshape(codes.shape)

"""GPTQ: quantize a weight column by column, folding each column's rounding error into the columns
not yet quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

A pure function of (weight, Hessian, scheme): the pipeline supplies H = 2/n * sum(X^T X).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from qtool.errors import FAILURE, QtoolError
from qtool.quantize.grid import Grid, fit_grid, round_to_grid
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme

log = logging.getLogger(__name__)
ACT_ORDERS = ("none", "static", "group")
DAMP_RETRIES = 6


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    row_terms: torch.Tensor  # [2, out] float64: ||(W - Q)_r X||^2 and ||W_r X||^2 per row r, through H
    damp: float  # the damping that made H positive definite (raised from the asked one if needed)

    @property
    def error(self) -> float:
        """||WX - QX||^2 / ||WX||^2 on the calibration inputs."""
        return error_ratio(self.row_terms)

    def part_errors(self, sizes: list[int]) -> list[float]:
        """The error of each run of rows (layers solved together), from the same terms."""
        return [error_ratio(terms) for terms in self.row_terms.split(sizes, dim=1)]


def _inverse_hessian_factor(build_hessian: Callable[[], torch.Tensor], damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 for H = build_hessian();
    damping grows tenfold until both factorisations succeed. At most two [in, in] matrices live
    at a time: large layers' Hessians are the biggest tensors of a calibration."""
    for attempt in range(DAMP_RETRIES):
        hessian = build_hessian()
        hessian.diagonal().add_(damp * hessian.diagonal().mean())
        factor, info = torch.linalg.cholesky_ex(hessian)
        del hessian
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0:
                return upper, damp
        log.warning("Hessian not positive definite at damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise QtoolError("the Hessian stays singular even with heavy damping; use more calibration samples", FAILURE)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: str = "none",
    scale_dtype: torch.dtype | None = None,
    mse: bool = False,
) -> GPTQResult:
    """Quantize `weight` [out, in] given the input Hessian [in, in]; scales are stored in
    `scale_dtype` (default: the weight's dtype), and searched for the least rounding error with `mse`.

    Grids are fitted as their group is reached, on the weights as updated so far (act-order
    `static`: on the original weights, up front). The block size is adjusted so that groups start
    at block boundaries or at fixed offsets inside blocks, which keeps every full block's sweep the
    same sequence of operations (replayed as a CUDA graph on GPUs).
    """
    if act_order not in ACT_ORDERS:
        raise QtoolError(f"unknown act-order {act_order!r}; choose one of: {', '.join(ACT_ORDERS)}")
    scale_dtype = scale_dtype or weight.dtype
    out_features, in_features = weight.shape
    device = weight.device
    group_size = in_features if scheme.group_size == -1 else scheme.group_size
    block_size = _aligned_block_size(block_size, group_size)
    per_group = Scheme(scheme.bits, -1, scheme.symmetric)
    W = weight.detach().float()  # a copy unless the weight is float32 already: then the indexing below copies
    diagonal = hessian.diagonal()
    dead = diagonal == 0

    columns = torch.arange(in_features, device=device)
    order = torch.argsort(diagonal, descending=True) if act_order != "none" else columns
    W = W[:, order]
    W[:, dead[order]] = 0

    def permuted_hessian() -> torch.Tensor:
        H = hessian.detach().float().index_select(0, order).index_select(1, order)
        H.diagonal()[dead[order]] = 1
        return H

    Hinv, used_damp = _inverse_hessian_factor(permuted_hessian, damp)

    n_groups = in_features // group_size
    scales = torch.empty(out_features, n_groups, dtype=scale_dtype, device=device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.int32, device=device)
    if act_order == "static":  # groups keep the original column order; fit them all up front
        column_group = order // group_size
        for g in range(n_groups):
            group = slice(g * group_size, (g + 1) * group_size)
            grid = fit_grid(weight[:, group].float().masked_fill(dead[group], 0), per_group, scale_dtype, mse)
            scales[:, g], zeros[:, g] = grid.scales[:, 0], grid.zeros[:, 0]
    else:
        column_group = columns // group_size
    fit_inside = group_size if act_order != "static" and group_size < block_size else None
    sweep = _sweep_runner(device, out_features, block_size, fit_inside, per_group, scale_dtype, mse)

    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        if act_order != "static" and fit_inside is None and start % group_size == 0:
            grid = fit_grid(W[:, start : start + group_size], per_group, scale_dtype, mse)
            scales[:, start // group_size], zeros[:, start // group_size] = grid.scales[:, 0], grid.zeros[:, 0]
        block_groups = column_group[start:end]
        column_scales, column_zeros = scales[:, block_groups].float(), zeros[:, block_groups]
        block_codes, errors, column_scales, column_zeros = sweep(
            W[:, start:end], Hinv[start:end, start:end], column_scales, column_zeros
        )
        codes[:, start:end] = block_codes
        if fit_inside is not None:
            fitted = slice(start // group_size, end // group_size)
            scales[:, fitted] = column_scales[:, ::group_size].to(scale_dtype)
            zeros[:, fitted] = column_zeros[:, ::group_size]
        W[:, end:].addmm_(errors, Hinv[start:end, end:], alpha=-1)

    inverse_order = torch.argsort(order)
    codes = codes[:, inverse_order]
    g_idx = column_group[inverse_order].to(torch.int32) if act_order == "group" else None
    quantized = QuantizedWeight.from_codes(codes, Grid(scales, zeros), scheme, g_idx=g_idx)
    original = weight.detach().float().masked_fill(dead, 0)
    return GPTQResult(quantized, output_error_terms(original, quantized, hessian.float()), used_damp)


def _aligned_block_size(block_size: int, group_size: int) -> int:
    """A block size whose blocks hold whole groups, or that divides the group size."""
    if group_size <= block_size:
        return block_size - block_size % group_size
    while group_size % block_size:
        block_size -= 1
    return block_size


def sweep_block(
    block: torch.Tensor,
    inverse: torch.Tensor,
    column_scales: torch.Tensor,
    column_zeros: torch.Tensor,
    fit_every: int | None,
    grid_scheme: Scheme,
    scale_dtype: torch.dtype,
    mse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a block of columns [out, width] in place of `block`, one column at a time, pushing
    each column's error onto the columns after it through the block's inverse-Hessian factor.

    With `fit_every`, the grid of each run of `fit_every` columns is fitted (into `column_scales`,
    `column_zeros`) when the sweep reaches it. Returns the codes and the scaled errors [out, width].
    A fixed sequence of tensor operations, with no host synchronisation, so it can be captured.
    """
    width = block.shape[1]
    codes = torch.empty(block.shape, dtype=torch.int32, device=block.device)
    errors = torch.empty_like(block)
    for i in range(width):
        if fit_every is not None and i % fit_every == 0:
            grid = fit_grid(block[:, i : i + fit_every], grid_scheme, scale_dtype, mse)
            column_scales[:, i : i + fit_every] = grid.scales.float()
            column_zeros[:, i : i + fit_every] = grid.zeros
        scale, zero = column_scales[:, i], column_zeros[:, i]
        q = round_to_grid(block[:, i], scale, zero, grid_scheme.bits)
        codes[:, i] = q
        error = (block[:, i] - (q - zero) * scale) / inverse[i, i]
        block[:, i:].addr_(error, inverse[i, i:], alpha=-1)
        errors[:, i] = error
    return codes, errors


def _sweep_runner(device, out_features, block_size, fit_every, grid_scheme, scale_dtype, mse):
    """sweep(block, inverse, column_scales, column_zeros) -> (codes, errors, column_scales,
    column_zeros), for blocks that are views into W. On CUDA a full-width block's sweep is
    captured once as a graph and replayed (the sweep is launch-bound: ~20 small kernels per
    column); elsewhere, and for a shorter last block, it runs as it is."""

    def eager(block, inverse, column_scales, column_zeros):
        block = block.clone()
        codes, errors = sweep_block(block, inverse, column_scales, column_zeros, fit_every, grid_scheme, scale_dtype, mse)
        return codes, errors, column_scales, column_zeros

    if torch.device(device).type != "cuda" or os.environ.get("QTOOL_CUDA_GRAPHS", "1") == "0":
        return eager
    static_block = torch.zeros(out_features, block_size, device=device)
    static_inverse = torch.eye(block_size, device=device)
    static_scales = torch.ones(out_features, block_size, device=device)
    static_zeros = torch.zeros(out_features, block_size, dtype=torch.int32, device=device)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the main stream, as capture requires
        sweep_block(static_block.clone(), static_inverse, static_scales.clone(), static_zeros.clone(),
                    fit_every, grid_scheme, scale_dtype, mse)
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.cuda.graph(graph):
        static_codes, static_errors = sweep_block(
            static_block, static_inverse, static_scales, static_zeros, fit_every, grid_scheme, scale_dtype, mse
        )

    def replay(block, inverse, column_scales, column_zeros):
        if block.shape[1] != block_size:
            return eager(block, inverse, column_scales, column_zeros)
        static_block.copy_(block)
        static_inverse.copy_(inverse)
        static_scales.copy_(column_scales)
        static_zeros.copy_(column_zeros)
        graph.replay()
        return static_codes, static_errors, static_scales, static_zeros

    return replay


def output_error_terms(weight: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor,
                       rows: int = 2048) -> torch.Tensor:
    """[2, out] float64: per row r, ||(W - Q)_r X||^2 and ||W_r X||^2 for the inputs X whose
    Hessian is H (proportional to X^T X), computed a few thousand rows at a time."""
    terms = []
    sizes = [min(rows, weight.shape[0] - start) for start in range(0, weight.shape[0], rows)]
    for part, reference in zip(quantized.split_rows(sizes), weight.split(rows)):
        reference = reference.float()
        delta = reference - part.dequantize()
        terms.append(torch.stack([(delta @ hessian * delta).sum(dim=1), (reference @ hessian * reference).sum(dim=1)]))
    return torch.cat(terms, dim=1).double()


def error_ratio(terms: torch.Tensor) -> float:
    numerator, denominator = terms.sum(dim=1).tolist()
    return numerator / max(denominator, 1e-30)


def output_error(weight: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor) -> float:
    """||WX - QX||^2 / ||WX||^2 for the inputs X whose Hessian is H."""
    return error_ratio(output_error_terms(weight, quantized, hessian))

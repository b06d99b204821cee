"""GPTQ: quantize a weight column by column, folding each column's rounding error into the columns
not yet quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

A pure function of (weight, Hessian, scheme): the pipeline supplies H = 2/n * sum(X^T X).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qtool.errors import FAILURE, QtoolError
from qtool.quantize.grid import Grid, fit_minmax, round_to_grid
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme

log = logging.getLogger(__name__)
ACT_ORDERS = ("none", "static", "group")
DAMP_RETRIES = 6


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    error: float  # ||WX - QX||^2 / ||WX||^2 on the calibration inputs, through H
    damp: float  # the damping that made H positive definite (raised from the asked one if needed)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; damping grows tenfold until H factors."""
    mean_diagonal = hessian.diagonal().mean().item()
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(DAMP_RETRIES):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diagonal * identity)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
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
) -> GPTQResult:
    """Quantize `weight` [out, in] given the input Hessian [in, in]; scales are stored in
    `scale_dtype` (default: the weight's dtype)."""
    if act_order not in ACT_ORDERS:
        raise QtoolError(f"unknown act-order {act_order!r}; choose one of: {', '.join(ACT_ORDERS)}")
    scale_dtype = scale_dtype or weight.dtype
    out_features, in_features = weight.shape
    group_size = in_features if scheme.group_size == -1 else scheme.group_size
    per_group = Scheme(scheme.bits, -1, scheme.symmetric)
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    original = W.clone()

    order = torch.argsort(H.diagonal(), descending=True) if act_order != "none" else torch.arange(in_features)
    W, H = W[:, order], H[order][:, order]
    Hinv, used_damp = _inverse_hessian_factor(H, damp)

    n_groups = in_features // group_size
    scales = torch.empty(out_features, n_groups, dtype=scale_dtype, device=W.device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.int32, device=W.device)
    # which group each (permuted) column belongs to, and whether its grid is fitted on reaching it
    if act_order == "static":  # groups keep the original column order; fit them all up front
        column_group = order // group_size
        for g in range(n_groups):
            grid = fit_minmax(original[:, g * group_size : (g + 1) * group_size], per_group, scale_dtype)
            scales[:, g], zeros[:, g] = grid.scales[:, 0], grid.zeros[:, 0]
    else:
        column_group = torch.arange(in_features) // group_size

    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=W.device)
    groups_of_columns = column_group.tolist()
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = W[:, start:end].clone()
        errors = torch.empty_like(block)
        block_inverse = Hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = groups_of_columns[column]
            if act_order != "static" and column % group_size == 0:
                upcoming = torch.cat([block[:, i:], W[:, end:]], dim=1)[:, :group_size]
                grid: Grid = fit_minmax(upcoming, per_group, scale_dtype)
                scales[:, group], zeros[:, group] = grid.scales[:, 0], grid.zeros[:, 0]
            scale, zero = scales[:, group].float(), zeros[:, group]
            q = round_to_grid(block[:, i], scale, zero, scheme.bits)
            codes[:, column] = q
            error = (block[:, i] - (q - zero) * scale) / block_inverse[i, i]
            block[:, i:].addr_(error, block_inverse[i, i:], alpha=-1)
            errors[:, i] = error
        W[:, end:].addmm_(errors, Hinv[start:end, end:], alpha=-1)

    inverse_order = torch.argsort(order)
    codes = codes[:, inverse_order]
    g_idx = column_group[inverse_order].to(torch.int32) if act_order == "group" else None
    if act_order == "static":
        g_idx = None  # groups are contiguous in the original order
    quantized = QuantizedWeight.from_codes(codes, Grid(scales, zeros), scheme, g_idx=g_idx)
    return GPTQResult(quantized, output_error(original, quantized.dequantize(), hessian.float()), used_damp)


def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """||WX - QX||^2 / ||WX||^2 for the inputs X whose Hessian is H (proportional to X^T X)."""
    delta = weight - approximation
    numerator = (delta @ hessian * delta).sum().item()
    return numerator / max((weight @ hessian * weight).sum().item(), 1e-30)

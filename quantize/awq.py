"""AWQ: activation-aware per-channel scales and clipping ranges (Lin et al., 2023).

Input channels that carry large activations matter most to a layer's output; scaling them up
before quantization (and the producer of the input down by the same factor) gives them finer
steps. For each group of linears reading one tensor X the scale is s = mean|x|^a (over the
weights' mean relative magnitude^(1-a), "duo scaling"), with a searched on a grid for the least
output error. Clipping then shrinks each group's range where that lowers the output error.

Both searches measure the output error ||(W - Q) X||^2 through the Hessian H ~ X^T X of the
layer inputs: (W - Q) H (W - Q)^T, the same number as running the tokens through both weights,
at a cost that does not grow with the number of calibration tokens.
"""

from __future__ import annotations

import logging
import re

import torch

from qtool.calibrate.folding import ScalingGroup, collect_group_stats, fold_scales, quantized_scaling_groups
from qtool.calibrate.pipeline import BlockRun
from qtool.calibrate.stats import ActivationStat
from qtool.quantize.grid import dequantize_codes, fit_minmax, grouped, quantize_to_codes
from qtool.quantize.scheme import AWQOptions, Scheme

log = logging.getLogger(__name__)
SCALE_FLOOR = 1e-4


def fake_quantize(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype) -> torch.Tensor:
    """`weight` rounded to its min-max grids and read back, in float32."""
    grid = fit_minmax(weight, scheme, scale_dtype)
    return dequantize_codes(quantize_to_codes(weight, grid, scheme), grid.scales, grid.zeros, scheme.group_size)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Sum over rows of delta H delta^T: the squared output error of a weight change on X."""
    return (delta @ hessian * delta).sum(dtype=torch.float64)


def search_scales(weight: torch.Tensor, stat: ActivationStat, scheme: Scheme, options: AWQOptions,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale (normalised: geometric mean of its extremes 1) for the rows of
    `weight` (the group's linears stacked), and the exponent a it came from."""
    weight = weight.to(stat.hessian.dtype)
    x_mean = stat.mean_abs.clamp(min=SCALE_FLOOR)
    w_mean = _relative_magnitudes(weight, scheme).clamp(min=SCALE_FLOOR)
    best, best_error, best_ratio = None, None, 0.0
    for step in range(options.grid):
        ratio = step / options.grid
        scales = x_mean.pow(ratio)
        if options.duo_scaling:
            scales = scales / w_mean.pow(1 - ratio)
        scales = scales.clamp(min=SCALE_FLOOR)
        scales = scales / (scales.max() * scales.min()).sqrt()
        restored = fake_quantize(weight * scales, scheme, scale_dtype) / scales
        error = output_error(weight - restored, stat.hessian).item()
        if best_error is None or error < best_error:
            best, best_error, best_ratio = scales, error, ratio
    return best, best_ratio


def _relative_magnitudes(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Per input channel, the mean over rows of |w| relative to the largest |w| of its group."""
    groups = grouped(weight.abs(), scheme.group_size)
    relative = groups / (groups.amax(dim=-1, keepdim=True) + 1e-6)
    return relative.reshape(weight.shape).mean(dim=0)


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, options: AWQOptions,
                scale_dtype: torch.dtype) -> torch.Tensor:
    """Per row and group, the bound m (weights clamped to [-m, m] before their grid is fitted)
    among max|w| * (1 ... max_shrink) that gives the least output error of that group's columns."""
    weight = weight.to(hessian.dtype)
    size = weight.shape[1] if scheme.group_size == -1 else scheme.group_size
    blocks = torch.stack([hessian[g : g + size, g : g + size] for g in range(0, weight.shape[1], size)])
    limits = grouped(weight, scheme.group_size).abs().amax(dim=-1, keepdim=True)
    best_error = best_limit = None
    for step in range(options.grid):
        limit = limits * (1 - (1 - options.max_shrink) * step / (options.grid - 1))
        clamped = torch.minimum(torch.maximum(grouped(weight, scheme.group_size), -limit), limit)
        delta = grouped(weight - fake_quantize(clamped.reshape(weight.shape), scheme, scale_dtype), scheme.group_size)
        error = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)
        if best_error is None:
            best_error, best_limit = error, limit
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_limit = torch.where(better.unsqueeze(-1), limit, best_limit)
    return best_limit


def clip_(weight: torch.Tensor, limit: torch.Tensor, scheme: Scheme) -> None:
    """Clamp `weight` in place to [-limit, limit] per row and group."""
    groups = grouped(weight.data, scheme.group_size)
    limit = limit.to(weight.dtype)
    torch.minimum(torch.maximum(groups, -limit), limit, out=groups)


def prepare_block(run: BlockRun, plan: dict, recipe, scale_dtype: torch.dtype | None) -> dict[str, ActivationStat]:
    """Search and fold the block's scales, then clip its layers. Returns the statistic of each
    input group (keyed by its first linear) as it is after folding.

    One pass collects the statistics of every input group on the block as it is; scales are
    searched group by group in forward order and folded at once (folding changes no function, so
    the statistics stay valid, with X / s in place of X for a scaled group)."""
    options: AWQOptions = recipe.awq
    stats, stat_of = collect_group_stats(run, plan, ActivationStat)
    for group, quantized in quantized_scaling_groups(run, plan):
        scheme, stat = plan[run.full_name(quantized[0])], stat_of[group.linears[0]]
        weight = torch.cat([run.linears[name].weight.data for name in quantized])
        scales, ratio = search_scales(weight, stat, scheme, options, scale_dtype or weight.dtype)
        del weight
        log.debug("%s: scales from mean|x|^%.2f folded into %s", run.full_name(group.linears[0]), ratio, group.producer)
        fold_scales(run.block, group, scales)
        stat.hessian.div_(scales.unsqueeze(0) * scales.unsqueeze(1))
        stat.mean_abs.div_(scales)
    if options.clip:
        skip = re.compile(options.clip_skip)
        for name, stat in stat_of.items():
            scheme = plan.get(run.full_name(name))
            if scheme is None or skip.search(run.full_name(name)):
                continue
            weight = run.linears[name].weight
            clip_(weight, search_clip(weight.data, stat.hessian, scheme, options, scale_dtype or weight.dtype), scheme)
    return stats

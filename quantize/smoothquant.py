"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights, so
that both quantize to int8 per token / per channel with little loss.

For the linears reading one tensor X, input channel j gets s_j = max|X_j|^a / max_i |W_ij|^(1-a)
(W: the group's weights stacked). X / s and W * s give the same product; X / s has its outlier
channels tamed, W * s takes them on. a = 0.5 splits the difficulty evenly; the default 0.8 moves
more into the weights, whose per-channel grids absorb it. With alpha "auto", a is searched for
each group on a grid, for the least error of the int8 product (tokens rounded per token, weights
to their grid) on a sample of the group's calibration inputs: one strength does not suit every
layer (down_proj's inputs carry far larger outliers than the attention's). The scales are
folded exactly into the module before the group, found as AWQ finds it (`qtool.calibrate.folding`).
"""

from __future__ import annotations

import logging

import torch

from qtool.calibrate.folding import collect_group_stats, fold_scales, quantized_scaling_groups
from qtool.calibrate.pipeline import BlockRun
from qtool.calibrate.stats import ChannelMaxStat, ChannelSampleStat
from qtool.kernels.int8_matmul import quantize_per_token
from qtool.quantize.awq import fake_quantize
from qtool.quantize.scheme import Scheme

log = logging.getLogger(__name__)
SCALE_FLOOR = 1e-5
ALPHA_GRID = 10  # auto: alpha in 0, 0.1, ..., 1


def smoothing_scales(max_abs: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max_i |w_ij|^(1 - alpha), per input channel j."""
    activations = max_abs.float().clamp(min=SCALE_FLOOR)
    weights = weight.abs().amax(dim=0).float().clamp(min=SCALE_FLOOR)
    return (activations.pow(alpha) / weights.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


def int8_product_error(inputs: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, scheme: Scheme,
                       scale_dtype: torch.dtype, exact: torch.Tensor | None = None) -> float:
    """||X W^T - Q(X / s) Q(W s)^T||^2: tokens rounded to int8 per token, weights to their grid
    (`exact`: X W^T, when the caller has it)."""
    codes, token_scales = quantize_per_token(inputs / scales)
    product = (codes.float() * token_scales) @ fake_quantize(weight * scales, scheme, scale_dtype).t()
    exact = inputs @ weight.t() if exact is None else exact
    return (exact - product).pow(2).sum(dtype=torch.float64).item()


def search_alpha(stat: ChannelSampleStat, weight: torch.Tensor, scheme: Scheme,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The smoothing scales, among alpha = 0, 1/ALPHA_GRID, ..., 1, whose int8 product errs least on
    the stat's sample of tokens, and that alpha."""
    inputs, weight = stat.sample().float(), weight.float()
    exact = inputs @ weight.t()
    candidates = [(smoothing_scales(stat.max_abs, weight, step / ALPHA_GRID), step / ALPHA_GRID)
                  for step in range(ALPHA_GRID + 1)]
    return min(candidates, key=lambda candidate: int8_product_error(inputs, weight, candidate[0], scheme, scale_dtype,
                                                                    exact))


def smooth_block(run: BlockRun, plan: dict, recipe, scale_dtype: torch.dtype | None) -> dict[str, ChannelMaxStat]:
    """Fold the smoothing scales of every group of quantized linears that has a module before it to
    take them. Returns each input group's channel maxima (keyed by its first linear), divided by
    its scales, i.e. as the smoothed block sees them."""
    alpha = recipe.smoothquant.alpha
    stats, stat_of = collect_group_stats(run, plan, ChannelSampleStat if alpha == "auto" else ChannelMaxStat)
    for group, quantized in quantized_scaling_groups(run, plan):
        stat = stat_of[group.linears[0]]
        weight = torch.cat([run.linears[name].weight.data for name in quantized])
        if alpha == "auto":
            scheme = plan[run.full_name(quantized[0])]
            scales, chosen = search_alpha(stat, weight, scheme, scale_dtype or weight.dtype)
            log.debug("%s: alpha %.1f", run.full_name(group.linears[0]), chosen)
        else:
            scales = smoothing_scales(stat.max_abs, weight, alpha)
        fold_scales(run.block, group, scales)
        stat.max_abs.div_(scales.to(stat.max_abs))
    return stats

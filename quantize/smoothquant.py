"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights, so
that both quantize to int8 per token / per channel with little loss.

For the linears reading one tensor X, input channel j gets s_j = max|X_j|^a / max_i |W_ij|^(1-a)
(W: the group's weights stacked). X / s and W * s give the same product; X / s has its outlier
channels tamed, W * s takes them on. a = 0.5 splits the difficulty evenly; the default 0.8 moves
more into the weights, whose per-channel grids absorb it. The scales are folded exactly into the
module before the group, found as AWQ finds it (`qtool.calibrate.folding`).
"""

from __future__ import annotations

import torch

from qtool.calibrate.folding import collect_group_stats, fold_scales, quantized_scaling_groups
from qtool.calibrate.pipeline import BlockRun
from qtool.calibrate.stats import ChannelMaxStat

SCALE_FLOOR = 1e-5


def smoothing_scales(max_abs: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max_i |w_ij|^(1 - alpha), per input channel j."""
    activations = max_abs.float().clamp(min=SCALE_FLOOR)
    weights = weight.abs().amax(dim=0).float().clamp(min=SCALE_FLOOR)
    return (activations.pow(alpha) / weights.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


def smooth_block(run: BlockRun, plan: dict, recipe, scale_dtype: torch.dtype | None) -> dict[str, ChannelMaxStat]:
    """Fold the smoothing scales of every group of quantized linears that has a module before it to
    take them. Returns each input group's channel maxima (keyed by its first linear), divided by
    its scales, i.e. as the smoothed block sees them."""
    alpha = recipe.smoothquant.alpha
    stats, stat_of = collect_group_stats(run, plan, ChannelMaxStat)
    for group, quantized in quantized_scaling_groups(run, plan):
        stat = stat_of[group.linears[0]]
        weight = torch.cat([run.linears[name].weight.data for name in quantized])
        scales = smoothing_scales(stat.max_abs, weight, alpha)
        fold_scales(run.block, group, scales)
        stat.max_abs.div_(scales.to(stat.max_abs))
    return stats

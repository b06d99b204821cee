"""SqueezeLLM: sensitivity-weighted non-uniform quantization with dense-and-sparse outliers (Kim et al., 2023).

Each row (or each group of a row) gets its own 2**bits values, a look-up table, chosen by
weighted k-means: the centroids c minimise sum_i F_i (w_i - c(w_i))^2, where F is the diagonal
Fisher information of the weights, so the weights the loss is most sensitive to are kept most
precisely. Optionally a small fraction of weights (the largest in magnitude, and the most
sensitive) is taken out before clustering and kept exactly, as a sparse matrix added back at run
time.

The k-means is one-dimensional, so clusters are runs of the sorted values: each row is sorted
once, prefix sums of F and F*w are taken once, and every Lloyd iteration only looks up the
cluster boundaries (the midpoints between neighbouring centroids) in the sorted values: all rows
at once, O(k log n) per row and iteration, and the same result on every device (no scattered
floating-point sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.quantize import packing
from qtool.quantize.grid import grouped
from qtool.quantize.qweight import QuantizedWeight, SparseOutliers
from qtool.quantize.scheme import Scheme

ROW_CHUNK = 4096  # rows clustered at once: bounds the float64 prefix sums to ~ROW_CHUNK * n * 16 bytes


@dataclass
class Clusters:
    """Sorted centroids [rows, k], each value's cluster [rows, n], and the Lloyd iterations run."""

    centroids: torch.Tensor
    codes: torch.Tensor
    iterations: int


def weighted_kmeans(values: torch.Tensor, weights: torch.Tensor, k: int, max_iterations: int = 100) -> Clusters:
    """k centroids per row of `values` [rows, n] minimising the `weights`-weighted squared error,
    by Lloyd iterations from weighted quantiles; stops when no cluster boundary moves, or after
    `max_iterations`. A row whose weights are all zero is clustered with equal weights."""
    if values.shape[0] > ROW_CHUNK:
        parts = [weighted_kmeans(v, w, k, max_iterations) for v, w in zip(values.split(ROW_CHUNK), weights.split(ROW_CHUNK))]
        return Clusters(torch.cat([p.centroids for p in parts]), torch.cat([p.codes for p in parts]),
                        max(p.iterations for p in parts))
    values = values.float()
    weights = weights.float().clamp(min=0)
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
    ordered, order = values.sort(dim=1, stable=True)
    ordered_weights = weights.gather(1, order).double()
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
    mass = torch.cat([zero, ordered_weights.cumsum(dim=1)], dim=1)  # [rows, n + 1]
    moment = torch.cat([zero, (ordered_weights * ordered.double()).cumsum(dim=1)], dim=1)

    # initial centroids: the weighted quantiles at (j + 1/2) / k
    targets = mass[:, -1:] * (torch.arange(k, device=values.device, dtype=torch.float64) + 0.5) / k
    centroids = ordered.gather(1, torch.searchsorted(mass[:, 1:].contiguous(), targets).clamp(max=values.shape[1] - 1))
    bounds = None
    for iteration in range(1, max_iterations + 1):
        new_bounds = _cluster_bounds(ordered, centroids)
        if bounds is not None and torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
        cluster_mass = mass.gather(1, bounds[:, 1:]) - mass.gather(1, bounds[:, :-1])
        cluster_moment = moment.gather(1, bounds[:, 1:]) - moment.gather(1, bounds[:, :-1])
        means = (cluster_moment / cluster_mass.clamp(min=1e-300)).float()
        centroids = torch.where(cluster_mass > 0, means, centroids).sort(dim=1).values
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
    codes = torch.searchsorted(midpoints.contiguous(), values.contiguous())  # ties go low, as in the bounds
    return Clusters(centroids, codes.to(torch.int32), iteration)


def _cluster_bounds(ordered: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[rows, k + 1] positions in the sorted values where each centroid's cluster starts (and the end)."""
    midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    inner = torch.searchsorted(ordered.contiguous(), midpoints, side="right")
    rows = ordered.shape[0]
    start = torch.zeros(rows, 1, dtype=inner.dtype, device=inner.device)
    end = torch.full((rows, 1), ordered.shape[1], dtype=inner.dtype, device=inner.device)
    return torch.cat([start, inner, end], dim=1)


def outlier_mask(weight: torch.Tensor, fisher: torch.Tensor | None, fraction: float, sensitive_fraction: float) -> torch.Tensor:
    """The weights kept exactly, as a boolean mask: `fraction` of them in all, of which
    `sensitive_fraction` are those with the largest Fisher information and the rest those
    furthest outside the layer's bulk (the largest |w - median| per layer, i.e. beyond the
    percentile thresholds that leave that many out)."""
    count = round(fraction * weight.numel())
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if count == 0:
        return mask
    sensitive = min(round(sensitive_fraction * weight.numel()), count) if fisher is not None else 0
    flat = mask.view(-1)
    if sensitive:
        flat[fisher.reshape(-1).float().topk(sensitive, sorted=False).indices] = True
    spread = (weight.float() - weight.float().median()).abs().reshape(-1)
    spread[flat] = -1.0  # already taken
    flat[spread.topk(count - sensitive, sorted=False).indices] = True
    return mask


def squeeze(weight: torch.Tensor, fisher: torch.Tensor | None, scheme: Scheme, outliers: float = 0.0,
            sensitive_fraction: float = 0.0005, max_iterations: int = 100,
            lut_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """The SqueezeLLM form of `weight` [out, in]: per row (or per row and group of `scheme.group_size`
    columns) a LUT of 2**bits values found by k-means weighted by `fisher` (equal weights when
    None), codes packed like any integer weight, and the `outliers` fraction held out of the
    clustering and stored sparse (as the difference to their dense value, so they come back exact
    up to `lut_dtype` rounding)."""
    weight32 = weight.float()
    sensitivity = torch.ones_like(weight32) if fisher is None else fisher.float().to(weight.device)
    held_out = outlier_mask(weight32, fisher, outliers, sensitive_fraction)
    sensitivity = sensitivity.masked_fill(held_out, 0.0)
    rows = grouped(weight32, scheme.group_size)
    clusters = weighted_kmeans(rows.reshape(-1, rows.shape[-1]), grouped(sensitivity, scheme.group_size).reshape(-1, rows.shape[-1]),
                               2**scheme.bits, max_iterations)
    lut = clusters.centroids.to(lut_dtype).reshape(rows.shape[0], rows.shape[1], -1)
    codes = clusters.codes.reshape(weight.shape)
    result = QuantizedWeight(packing.pack(codes, scheme.bits), None, None, scheme, tuple(weight.shape), lut=lut)
    if held_out.any():
        dense = result.dequantize(torch.float32)
        residual = torch.where(held_out, weight32 - dense, torch.zeros_like(dense))
        result.outliers = SparseOutliers.from_dense(residual.to(lut_dtype), held_out)
    return result

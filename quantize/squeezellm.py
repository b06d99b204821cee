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
floating-point sums). Lloyd finds local optima only; it starts from the exact optimum over
runs of whole bins (dynamic programming), among other starts, and each row keeps the best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.quantize import packing
from qtool.quantize.grid import grouped
from qtool.quantize.qweight import QuantizedWeight, SparseOutliers
from qtool.quantize.scheme import Scheme

ROW_CHUNK = 1024  # rows clustered at once: bounds the float64 prefix sums to ~ROW_CHUNK * n * 24 bytes
DP_BINS, DP_ROWS = 128, 128  # the exact start's bins per row, and rows per step (~17 MB per float64 table)


@dataclass
class Clusters:
    """Sorted centroids [rows, k], each value's cluster [rows, n], and the Lloyd iterations run."""

    centroids: torch.Tensor
    codes: torch.Tensor
    iterations: int


def weighted_kmeans(values: torch.Tensor, weights: torch.Tensor, k: int, max_iterations: int = 100) -> Clusters:
    """k centroids per row of `values` [rows, n] minimising the `weights`-weighted squared error.

    Lloyd iterations stop when no cluster boundary moves, or after `max_iterations`. They only
    find a local optimum, and with heavy-tailed weights (Fisher information spans three or four
    orders of magnitude) which one depends on the start: each row is solved from four starts
    (the exact optimum over runs of whole bins of its sorted values, its weighted quantiles, its
    plain quantiles, and a uniform grid over its range) and keeps the best. A row whose weights
    are all zero is clustered with equal weights."""
    if values.shape[0] > ROW_CHUNK:
        parts = [weighted_kmeans(v, w, k, max_iterations) for v, w in zip(values.split(ROW_CHUNK), weights.split(ROW_CHUNK))]
        return Clusters(torch.cat([p.centroids for p in parts]), torch.cat([p.codes for p in parts]),
                        max(p.iterations for p in parts))
    values = values.float()
    weights = weights.float().clamp(min=0)
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
    rows = _SortedRows(values, weights)
    best = None
    for start in rows.starts(k):
        centroids, iterations = rows.lloyd(start, max_iterations)
        codes = _nearest(centroids, values)
        cost = (weights * (values - centroids.gather(1, codes.long())).pow(2)).sum(dim=1, dtype=torch.float64)
        if best is None:
            best, best_cost = Clusters(centroids, codes, iterations), cost
            continue
        better = cost < best_cost
        best = Clusters(torch.where(better.unsqueeze(1), centroids, best.centroids),
                        torch.where(better.unsqueeze(1), codes, best.codes), max(best.iterations, iterations))
        best_cost = torch.where(better, cost, best_cost)
    return best


class _SortedRows:
    """Each row sorted once, with prefix sums of the weights, of weight * value and of weight *
    value^2 (float64): any run of sorted values has its mass, mean and squared error in O(1)."""

    def __init__(self, values: torch.Tensor, weights: torch.Tensor):
        self.ordered, order = values.sort(dim=1, stable=True)
        ordered_weights = weights.gather(1, order).double()
        zero = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
        self.mass = torch.cat([zero, ordered_weights.cumsum(dim=1)], dim=1)  # [rows, n + 1]
        weighted_values = ordered_weights * self.ordered.double()
        self.moment = torch.cat([zero, weighted_values.cumsum(dim=1)], dim=1)
        self.square = torch.cat([zero, (weighted_values * self.ordered.double()).cumsum(dim=1)], dim=1)

    def starts(self, k: int) -> list[torch.Tensor]:
        """Initial centroids [rows, k]: the optimum over runs of whole bins (`binned_optimum`), the
        weighted quantiles, the plain quantiles and a uniform grid (the last three at (j + 1/2) / k)."""
        n = self.ordered.shape[1]
        fractions = (torch.arange(k, device=self.ordered.device, dtype=torch.float64) + 0.5) / k
        weighted = torch.searchsorted(self.mass[:, 1:].contiguous(), self.mass[:, -1:] * fractions)
        plain = (fractions * n).long().expand(self.ordered.shape[0], k)
        low, high = self.ordered[:, :1], self.ordered[:, -1:]
        return [self.binned_optimum(k), self.ordered.gather(1, weighted.clamp(max=n - 1)),
                self.ordered.gather(1, plain.clamp(max=n - 1)), low + (high - low) * fractions.float()]

    def binned_optimum(self, k: int, bins: int = DP_BINS) -> torch.Tensor:
        """The best k clusters [rows, k] among those made of whole bins (runs of n / `bins` sorted
        values), found exactly by dynamic programming over the bins: best[c][j], the least error
        of the first j bins in c clusters, is min over i < j of best[c-1][i] + error(bins i..j-1).
        Lloyd from there ends within about 1% of the true optimum on Fisher-weighted rows, where
        quantile starts end 1.5-2x above it. Rows go `DP_ROWS` at a time: the table of run
        errors is [rows, bins + 1, bins + 1]."""
        n = self.ordered.shape[1]
        edges = torch.linspace(0, n, min(bins, n) + 1, device=self.ordered.device).round().long().unique()
        parts = []
        for start in range(0, n and self.ordered.shape[0], DP_ROWS):
            rows = slice(start, start + DP_ROWS)
            mass, moment, square = (prefix[rows][:, edges] for prefix in (self.mass, self.moment, self.square))
            parts.append(_optimal_runs(mass, moment, square, k).float())
        centroids = torch.cat(parts)
        return torch.where(torch.isnan(centroids), self.ordered[:, :1], centroids)

    def lloyd(self, centroids: torch.Tensor, max_iterations: int) -> tuple[torch.Tensor, int]:
        """Weighted Lloyd iterations from `centroids`: sorted centroids, and the iterations run."""
        centroids = centroids.sort(dim=1).values
        bounds = None
        for iteration in range(1, max_iterations + 1):
            new_bounds = _cluster_bounds(self.ordered, centroids)
            if bounds is not None and torch.equal(new_bounds, bounds):
                break
            bounds = new_bounds
            mass = self.mass.gather(1, bounds[:, 1:]) - self.mass.gather(1, bounds[:, :-1])
            moment = self.moment.gather(1, bounds[:, 1:]) - self.moment.gather(1, bounds[:, :-1])
            means = (moment / mass.clamp(min=1e-300)).float()
            centroids = torch.where(mass > 0, means, centroids).sort(dim=1).values
        return centroids, iteration


def _optimal_runs(mass: torch.Tensor, moment: torch.Tensor, square: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids [rows, k] of the best split of each row's m bins (prefix sums [rows, m + 1]) into
    at most k runs; NaN for the clusters left unused."""
    rows, points = mass.shape
    run_mass = mass.unsqueeze(1) - mass.unsqueeze(2)  # [rows, i, j]: bins i .. j-1
    run_moment = moment.unsqueeze(1) - moment.unsqueeze(2)
    error = (square.unsqueeze(1) - square.unsqueeze(2)) - run_moment.pow(2) / run_mass.clamp(min=1e-300)
    index = torch.arange(points, device=mass.device)
    error = error.masked_fill(~(index.unsqueeze(1) < index.unsqueeze(0)), float("inf"))
    error = error.transpose(1, 2).float().contiguous()  # [rows, j, i]: the minimum runs along memory
    best = torch.full((rows, points), float("inf"), device=mass.device)
    best[:, 0] = 0
    choices = []
    for _ in range(k):  # one more cluster; -1: the prefix is best served with fewer
        extended, choice = (best.unsqueeze(1) + error).min(dim=2)
        keep = best <= extended
        choices.append(torch.where(keep, -1, choice))
        best = torch.where(keep, best, extended)
    centroids = torch.full((rows, k), float("nan"), dtype=torch.float64, device=mass.device)
    end = torch.full((rows,), points - 1, dtype=torch.long, device=mass.device)
    row = torch.arange(rows, device=mass.device)
    for cluster in reversed(range(k)):
        start = choices[cluster][row, end]
        used = start >= 0
        start = torch.where(used, start, end)
        run = mass[row, end] - mass[row, start]
        value = (moment[row, end] - moment[row, start]) / run.clamp(min=1e-300)
        centroids[:, cluster] = torch.where(used & (run > 0), value, centroids[:, cluster])
        end = start
    return centroids


def _nearest(centroids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The index of each value's nearest centroid (ties go low, as in the cluster bounds)."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous()).to(torch.int32)


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

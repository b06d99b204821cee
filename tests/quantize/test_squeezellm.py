import pytest
import torch

from qtool.quantize.qweight import SparseOutliers
from qtool.quantize.scheme import Scheme
from qtool.quantize.squeezellm import _nearest, _SortedRows, outlier_mask, squeeze, weighted_kmeans


def lloyd_reference(values: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, iterations: int) -> torch.Tensor:
    """Textbook weighted Lloyd, one row at a time, from the given centroids (float64)."""
    values, weights, centroids = values.double(), weights.double(), centroids.double().clone()
    for _ in range(iterations):
        codes = (values.unsqueeze(-1) - centroids.unsqueeze(1)).abs().argmin(-1)
        for row in range(values.shape[0]):
            for j in range(centroids.shape[1]):
                members = codes[row] == j
                mass = weights[row][members].sum()
                if mass > 0:
                    centroids[row, j] = (weights[row][members] * values[row][members]).sum() / mass
        centroids = centroids.sort(dim=1).values
    return centroids


def test_kmeans_reaches_a_fixed_point_of_weighted_lloyd():
    """At the end every centroid is the weighted mean of its cluster and every value sits in the
    cluster of its nearest centroid: one more textbook Lloyd step changes nothing."""
    values, weights = torch.randn(37, 203), torch.rand(37, 203)
    clusters = weighted_kmeans(values, weights, 8)
    assert clusters.iterations < 100
    nearest = (values.unsqueeze(-1) - clusters.centroids.unsqueeze(1)).abs().argmin(-1)
    assert torch.equal(nearest.int(), clusters.codes)
    after = lloyd_reference(values, weights, clusters.centroids, 1)
    torch.testing.assert_close(after.float(), clusters.centroids, atol=1e-5, rtol=1e-5)


def test_lloyd_follows_the_textbook_step_by_step():
    values, weights = torch.randn(5, 64), torch.rand(5, 64)
    rows = _SortedRows(values, weights)
    start = torch.randn(5, 4).sort(dim=1).values
    for steps in (1, 4):
        ours, _ = rows.lloyd(start, steps)
        torch.testing.assert_close(ours.double(), lloyd_reference(values, weights, start, steps), atol=1e-5, rtol=0)


def test_each_row_keeps_the_best_of_its_starts():
    """Heavy-tailed weights (as Fisher information is) trap Lloyd in poor local optima; the
    result is no worse than Lloyd from any one start, and strictly better than some on some rows."""
    values = torch.randn(64, 256)
    weights = torch.rand(64, 256).pow(8) * 1e4
    clusters = weighted_kmeans(values, weights, 8)
    cost = lambda centroids: (weights * (values - centroids.gather(  # noqa: E731
        1, _nearest(centroids, values).long())).pow(2)).sum(dim=1)
    best = cost(clusters.centroids)
    rows = _SortedRows(values, weights)
    single = torch.stack([cost(rows.lloyd(start, 100)[0]) for start in rows.starts(8)])
    assert (best <= single.min(dim=0).values * (1 + 1e-6)).all()
    assert (best < single.max(dim=0).values * 0.99).any()


def exact_optimum(values: torch.Tensor, weights: torch.Tensor, k: int) -> float:
    """The least weighted squared error of k clusters of one row, by plain dynamic programming."""
    order = values.double().argsort()
    v, w = values.double()[order].tolist(), weights.double()[order].tolist()
    n = len(v)

    def error(i, j):
        mass = sum(w[i:j])
        mean = sum(a * b for a, b in zip(w[i:j], v[i:j])) / mass if mass else 0.0
        return sum(b * (a - mean) ** 2 for a, b in zip(v[i:j], w[i:j]))

    best = [0.0] + [float("inf")] * n
    for _ in range(k):
        best = [0.0] + [min(best[i] + error(i, j) for i in range(j)) for j in range(1, n + 1)]
    return best[n]


def test_the_binned_start_is_the_exact_optimum_when_every_value_is_a_bin():
    values, weights = torch.randn(3, 30), torch.rand(3, 30).pow(4)
    rows = _SortedRows(values, weights)
    centroids = rows.binned_optimum(4)
    reached = (weights * (values - centroids.gather(1, _nearest(centroids, values).long())).pow(2)).sum(dim=1)
    for row in range(3):
        assert reached[row].item() == pytest.approx(exact_optimum(values[row], weights[row], 4), rel=1e-5)


def test_weights_pull_centroids_toward_what_matters():
    """One heavily weighted value per row gets a centroid of its own (its error vanishes)."""
    values = torch.randn(16, 128)
    weights = torch.full_like(values, 1e-3)
    weights[:, 7] = 1e3
    clusters = weighted_kmeans(values, weights, 4)
    chosen = clusters.centroids.gather(1, clusters.codes[:, 7:8].long()).squeeze(1)
    torch.testing.assert_close(chosen, values[:, 7], atol=1e-4, rtol=0)
    plain = weighted_kmeans(values, torch.ones_like(values), 4)
    error_weighted = (values[:, 7] - chosen).abs().mean()
    error_plain = (values[:, 7] - plain.centroids.gather(1, plain.codes[:, 7:8].long()).squeeze(1)).abs().mean()
    assert error_weighted < error_plain / 10


def test_kmeans_is_deterministic_and_handles_degenerate_rows():
    values = torch.randn(9, 50)
    values[0] = 0.5  # constant row
    values[1, :25] = -1.0  # two distinct values
    values[1, 25:] = 2.0
    weights = torch.rand(9, 50)
    weights[2] = 0  # no weight at all: equal weights instead
    first, second = weighted_kmeans(values, weights, 16), weighted_kmeans(values, weights, 16)
    assert torch.equal(first.centroids, second.centroids) and torch.equal(first.codes, second.codes)
    restored = first.centroids.gather(1, first.codes.long())
    assert torch.equal(restored[0], values[0]) and torch.equal(restored[1], values[1])
    assert torch.isfinite(first.centroids).all()


def test_kmeans_in_chunks_equals_kmeans_at_once(monkeypatch):
    import qtool.quantize.squeezellm as module

    values, weights = torch.randn(40, 96), torch.rand(40, 96)
    whole = weighted_kmeans(values, weights, 8)
    monkeypatch.setattr(module, "ROW_CHUNK", 16)
    chunked = weighted_kmeans(values, weights, 8)
    assert torch.equal(whole.centroids, chunked.centroids) and torch.equal(whole.codes, chunked.codes)


def test_outlier_mask_takes_the_most_sensitive_then_the_furthest_from_the_bulk():
    weight = torch.randn(64, 100)
    fisher = torch.rand(64, 100)
    fisher[3, 4] = 100.0  # the most sensitive weight, small in magnitude
    weight[3, 4] = 0.0
    weight[10, 20] = 50.0  # the furthest out
    mask = outlier_mask(weight, fisher, fraction=0.01, sensitive_fraction=0.0002)
    assert mask.sum() == round(0.01 * weight.numel())
    assert mask[3, 4] and mask[10, 20]
    spread = (weight - weight.median()).abs()
    kept_by_magnitude = spread[mask & (fisher < 100)]
    assert kept_by_magnitude.min() >= spread[~mask].max()
    assert not outlier_mask(weight, None, 0.0, 0.0005).any()


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, -1), (4, 25), (3, 50)])
def test_squeeze_round_trips_through_its_lut_and_outliers(bits, group_size):
    weight = torch.randn(24, 100) * 0.05
    fisher = torch.rand(24, 100)
    scheme = Scheme(bits, group_size, lut=True)
    dense = squeeze(weight, fisher, scheme)
    assert dense.lut.shape == (24, scheme.group_count(100), 2**bits) and dense.lut.dtype == torch.float16
    assert dense.outliers is None and dense.scales is None
    codes = dense.codes()
    expected = dense.lut.float().gather(2, codes.reshape(24, scheme.group_count(100), -1).long()).reshape(24, 100)
    torch.testing.assert_close(dense.dequantize(), expected)
    sparse = squeeze(weight, fisher, scheme, outliers=0.05)
    held = outlier_mask(weight, fisher, 0.05, 0.0005)
    assert len(sparse.outliers.values) == held.sum()
    restored = sparse.dequantize()
    torch.testing.assert_close(restored[held], weight[held], atol=1e-4, rtol=1e-3)  # kept (fp16 residuals)
    error = lambda q: (fisher * (q.dequantize() - weight).pow(2)).sum()  # noqa: E731
    assert error(sparse) < error(dense)


def test_sparse_outliers_split_by_rows_and_add_back():
    values = torch.randn(6, 10)
    mask = torch.rand(6, 10) > 0.7
    mask[2] = False  # an empty row
    sparse = SparseOutliers.from_dense(values, mask)
    dense = sparse.add_to(torch.zeros(6, 10))
    torch.testing.assert_close(dense, torch.where(mask, values, torch.zeros_like(values)))
    top, bottom = sparse.rows(0, 3), sparse.rows(3, 3)
    torch.testing.assert_close(top.add_to(torch.zeros(3, 10)), dense[:3])
    torch.testing.assert_close(bottom.add_to(torch.zeros(3, 10)), dense[3:])


@pytest.mark.parametrize("outliers", [0.0, 0.05])
def test_dequantizing_in_slabs_of_rows_gives_the_same_weight(monkeypatch, outliers):
    """Large weights are dequantized a slab of rows at a time (host memory); bit for bit the same,
    look-up tables, outliers and act-order groups included."""
    import qtool.quantize.qweight as qweight
    from qtool.quantize.gptq import gptq

    weight = torch.randn(24, 100) * 0.05
    lut = squeeze(weight, torch.rand(24, 100), Scheme(3, 25, lut=True), outliers=outliers)
    inputs = torch.randn(512, 100) * torch.linspace(0.1, 2, 100)
    grid = gptq(weight, 2 / 512 * inputs.T @ inputs, Scheme(4, 25, False), act_order="group").weight
    whole = [q.dequantize(dtype) for q in (lut, grid) for dtype in (torch.float32, torch.float16)]
    monkeypatch.setattr(qweight, "DEQUANTIZE_BYTES", 8 * 100 * 5)  # slabs of 5 rows, the last of 4
    assert grid.g_idx is not None
    for expected, slabbed in zip(whole, [q.dequantize(dtype) for q in (lut, grid) for dtype in (torch.float32, torch.float16)]):
        assert slabbed.dtype == expected.dtype and torch.equal(slabbed, expected)

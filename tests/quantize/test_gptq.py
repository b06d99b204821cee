import pytest
import torch

from qtool.quantize.gptq import gptq, output_error
from qtool.quantize.methods import round_to_nearest
from qtool.quantize.scheme import Scheme


def correlated_inputs(rows=2048, features=128):
    mixing = torch.randn(features, features) * 0.2 + torch.eye(features)
    return torch.randn(rows, features) @ mixing + torch.randn(features)


def hessian(inputs):
    return 2 * inputs.T @ inputs / inputs.shape[0]


@pytest.mark.parametrize("mse", [False, True])
@pytest.mark.parametrize("act_order", ["none", "static", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_the_layer_output(act_order, symmetric, mse):
    inputs, weight = correlated_inputs(), torch.randn(64, 128)
    scheme = Scheme(4, 32, symmetric)
    result = gptq(weight, hessian(inputs), scheme, block_size=64, act_order=act_order, mse=mse)
    rtn = round_to_nearest(weight, scheme).weight
    reference = inputs @ weight.T
    measured = ((reference - inputs @ result.weight.dequantize().T).pow(2).sum() / reference.pow(2).sum()).item()
    assert result.error == pytest.approx(measured, rel=1e-3)
    assert measured < 0.75 * output_error(weight, rtn, hessian(inputs))


def test_block_size_does_not_change_the_answer_much():
    inputs, weight = correlated_inputs(), torch.randn(32, 128)
    errors = [gptq(weight, hessian(inputs), Scheme(4, 32, False), block_size=size).error for size in (16, 128)]
    assert errors[0] == pytest.approx(errors[1], rel=0.05)


def test_group_act_order_writes_g_idx_with_full_groups():
    inputs, weight = correlated_inputs(), torch.randn(16, 128)
    inputs[:, 5] *= 30  # make the order differ from the column order
    result = gptq(weight, hessian(inputs), Scheme(4, 32, True), act_order="group")
    g_idx = result.weight.g_idx
    assert g_idx is not None and g_idx.shape == (128,)
    assert torch.bincount(g_idx.long()).tolist() == [32, 32, 32, 32]
    assert not torch.equal(g_idx, torch.arange(128) // 32)
    assert gptq(weight, hessian(inputs), Scheme(4, 32, True), act_order="static").weight.g_idx is None


def test_codes_and_scales_are_consistent_with_the_grid():
    inputs, weight = correlated_inputs(features=64), torch.randn(8, 64, dtype=torch.float16)
    result = gptq(weight, hessian(inputs), Scheme(3, 16, False))
    assert result.weight.scales.dtype == torch.float16
    codes = result.weight.codes()
    assert codes.min() >= 0 and codes.max() <= 7
    assert (result.weight.zeros >= 0).all() and (result.weight.zeros <= 7).all()


def test_dead_columns_are_zero_and_singular_hessians_get_more_damping():
    weight = torch.randn(4, 32)
    inputs = correlated_inputs(features=32)
    inputs[:, 3] = 0
    result = gptq(weight, hessian(inputs), Scheme(4, -1, True))
    assert torch.all(result.weight.dequantize()[:, 3] == 0)
    assert result.error == pytest.approx(output_error(weight.masked_fill(inputs[0] == 0, 0), result.weight,
                                                      hessian(inputs)), rel=1e-3)
    indefinite = torch.eye(32)
    indefinite[0, 1] = indefinite[1, 0] = 2.0
    raised = gptq(weight, indefinite, Scheme(4, -1, True), damp=0.01)
    assert raised.damp > 1


def test_layers_sharing_an_input_solve_together_exactly_as_alone():
    from qtool.calibrate.stats import HessianStat
    from qtool.quantize.methods import METHODS
    from qtool.quantize.scheme import Recipe

    inputs = correlated_inputs(features=64)
    stat = HessianStat(64)
    stat.update(inputs)
    weights = [torch.randn(16, 64), torch.randn(8, 64)]
    recipe = Recipe(method="gptq")
    hessian = stat.hessian.clone()
    together = METHODS.get("gptq").run(weights, Scheme(4, 32, False), stats=stat, recipe=recipe)
    assert stat.hessian is None  # used up: its memory held the factorisation
    for weight, result in zip(weights, together):
        alone = gptq(weight, hessian, Scheme(4, 32, False), act_order=recipe.gptq.act_order)
        assert torch.equal(result.weight.packed, alone.weight.packed)
        assert torch.equal(result.weight.scales, alone.weight.scales)
        assert result.error == pytest.approx(alone.error, rel=1e-4)


@pytest.mark.parametrize("spill", [False, True])
def test_the_hessian_can_be_factored_in_its_own_memory_with_retries(monkeypatch, spill):
    """Overwriting the Hessian gives the same answer; a failed factorisation retries from a saved
    copy, kept in memory or (large matrices) in a temporary file."""
    import qtool.quantize.gptq as gptq_module

    if spill:
        monkeypatch.setattr(gptq_module, "SPILL_BYTES", 0)
    inputs, weight = correlated_inputs(features=64), torch.randn(16, 64)
    kept = gptq(weight, hessian(inputs), Scheme(4, 32, False), act_order="static")
    scratch = hessian(inputs)
    overwritten = gptq(weight, scratch, Scheme(4, 32, False), act_order="static", overwrite_hessian=True)
    assert torch.equal(kept.weight.packed, overwritten.weight.packed)
    assert not torch.equal(scratch, hessian(inputs))
    indefinite = hessian(inputs)
    indefinite[0, 1] = indefinite[1, 0] = 4 * indefinite.diagonal().max()
    expected = gptq(weight, indefinite, Scheme(4, 32, False))
    raised = gptq(weight, indefinite.clone(), Scheme(4, 32, False), overwrite_hessian=True)
    assert raised.damp > 0.01 and raised.damp == expected.damp
    assert torch.equal(raised.weight.packed, expected.weight.packed)


def test_a_handed_over_hessian_is_freed_before_the_weight_is_packed(monkeypatch):
    """With overwrite_hessian and no other reference (HessianStat.take), the factor's memory goes
    back once the sweep is done: it does not sit beside packing and the error terms."""
    import qtool.quantize.gptq as gptq_module
    from torch.multiprocessing.reductions import StorageWeakRef

    inputs, weight = correlated_inputs(features=64), torch.randn(16, 64)
    handed = [hessian(inputs)]
    storage = StorageWeakRef(handed[0].untyped_storage())
    freed = []
    corrections = gptq_module._error_corrections
    monkeypatch.setattr(gptq_module, "_error_corrections", lambda *args: freed.append(storage.expired()) or corrections(*args))
    result = gptq(weight, handed.pop(), Scheme(4, 32, False), overwrite_hessian=True)
    assert freed == [True]
    assert torch.equal(result.weight.packed, gptq(weight, hessian(inputs), Scheme(4, 32, False)).weight.packed)


def test_large_hessians_are_factored_without_a_column_major_copy(monkeypatch):
    """Above SPILL_BYTES the column-major view is factored as upper: the same lower factor."""
    import qtool.quantize.gptq as gptq_module

    matrix = hessian(correlated_inputs(features=96))
    info = torch.zeros((), dtype=torch.int32)
    small, large = matrix.clone(), matrix.clone()
    gptq_module._cholesky_lower_(small, info)
    monkeypatch.setattr(gptq_module, "SPILL_BYTES", 0)
    gptq_module._cholesky_lower_(large, info)
    assert info.item() == 0
    assert (large.tril() - small.tril()).norm() <= 1e-5 * small.tril().norm()
    torch.testing.assert_close(large.tril() @ large.tril().t(), matrix, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [7, 300, 600])
def test_triangular_inverse_in_place(size):
    from qtool.quantize.gptq import _invert_lower_

    lower = torch.randn(size, size, dtype=torch.float64).tril() + size * torch.eye(size, dtype=torch.float64)
    inverse = lower.clone()
    _invert_lower_(inverse)
    assert torch.allclose(inverse, torch.linalg.inv(lower), atol=1e-12)


def test_float64_hessians_solve_in_float64_to_the_same_codes():
    inputs, weight = correlated_inputs(), torch.randn(32, 128)
    single = gptq(weight, hessian(inputs), Scheme(4, 32, False), act_order="static")
    double = gptq(weight.double(), hessian(inputs.double()), Scheme(4, 32, False), act_order="static")
    assert double.weight.scales.dtype == torch.float64
    assert (single.weight.codes() == double.weight.codes()).float().mean() > 0.95
    assert double.error == pytest.approx(single.error, rel=0.05)

"""Linears that read one input (q/k/v, gate/up) joined into one quantized product: the joined
kernel view gives each linear's own product, W8A8 linears join as one int8 weight, and weights of
different kinds are not joined."""

import pytest
import torch
from torch import nn

from qtool.kernels.quant_matmul import triton_matmul
from qtool.quantize.grid import fit_minmax, quantize_to_codes
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme
from qtool.runtime.quant_linear import FusedLinears, Int8Layout, QuantLinear, fused_kernel_layout, make_kernel_views

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1)


def quantized(out_features: int, bits: int = 4, group: int = 32, symmetric: bool = False):
    dense = torch.randn(out_features, 128) * 0.05
    scheme = Scheme(bits, group, symmetric)
    grid = fit_minmax(dense, scheme, torch.float16)
    return QuantizedWeight.from_codes(quantize_to_codes(dense, grid, scheme), grid, scheme).to(DEVICE)


def w8a8_linear(out_features: int, bias: bool = False) -> QuantLinear:
    scheme = Scheme(8, -1, True, activation_bits=8)
    dense = torch.randn(out_features, 128) * 0.05
    grid = fit_minmax(dense, scheme, torch.float16)
    weight = QuantizedWeight.from_codes(quantize_to_codes(dense, grid, scheme), grid, scheme)
    return QuantLinear(weight, torch.randn(out_features) if bias else None)


def product(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    return (x.float() @ weight.dequantize(torch.float16).float().t().to(x.device)).half()


def test_weights_of_one_kind_join_into_one_product():
    weights = [quantized(48), quantized(16), quantized(16)]
    layout = fused_kernel_layout(weights, torch.float16)
    x = torch.randn(3, 128, dtype=torch.float16, device=DEVICE)
    out = triton_matmul(x, layout.weight, config=SMALL)
    expected = torch.cat([product(x, weight) for weight in weights], dim=-1)
    assert out.shape == (3, 80)
    assert ((out.double() - expected.double()).norm() / expected.double().norm()).item() < 2e-3


@pytest.mark.parametrize("other", [dict(bits=8), dict(group=64), dict(symmetric=True)])
def test_weights_of_different_kinds_stay_apart(other):
    assert fused_kernel_layout([quantized(16), quantized(16, **other)], torch.float16) is None


def test_w8a8_linears_join_into_one_int8_product_that_gives_each_its_own_output():
    owner = nn.Module()
    owner.q, owner.k, owner.v = w8a8_linear(64, bias=True), w8a8_linear(32), w8a8_linear(32)
    owner.half().to(DEVICE)
    linears = [owner.q, owner.k, owner.v]
    layout, sizes, bias = FusedLinears(owner, ("q", "k", "v"))._fused_on(torch.device(DEVICE), torch.float16, linears)
    assert isinstance(layout, Int8Layout) and sizes == [64, 32, 32] and layout.weight.codes.shape == (128, 128)
    x = torch.randn(5, 128, dtype=torch.float16, device=DEVICE) * 3
    for out, linear in zip(layout.multiply(x, bias).split(sizes, dim=-1), linears):
        # the same integer sums and epilogue a column: equal on the reference path; on a GPU another tile
        # of the same kernels may contract the bias into a fused multiply-add
        if DEVICE == "cpu":
            assert torch.equal(out, linear(x))
        else:
            torch.testing.assert_close(out, linear(x), rtol=1e-3, atol=1e-3)


def test_w8a8_linears_and_others_are_not_joined():
    owner = nn.Module()
    owner.q, owner.k = w8a8_linear(32), QuantLinear(quantized(32))
    owner.to(DEVICE)
    assert FusedLinears(owner, ("q", "k"))._fused_on(torch.device(DEVICE), torch.float16, [owner.q, owner.k]) is None


def test_w8a8_linears_too_large_together_for_32_bit_offsets_are_not_joined():
    weight = w8a8_linear(32).quantized_weight()
    too_many = 2**31 // (32 * 128) + 1  # joined codes of 2^31 elements or more
    assert Int8Layout.joined([weight] * too_many, torch.device("meta")) is None


def test_without_a_joined_product_each_linear_runs_alone():
    owner = nn.Module()
    owner.gate, owner.up = nn.Linear(128, 32), QuantLinear(quantized(32))
    owner.to(DEVICE)
    x = torch.randn(2, 128, device=DEVICE)
    gate, up = FusedLinears(owner, ("gate", "up"))(x)  # a dense linear among them
    torch.testing.assert_close(gate, owner.gate(x))
    torch.testing.assert_close(up, owner.up(x))


@pytest.mark.skipif(DEVICE == "cpu", reason="linears are joined on CUDA only")
@pytest.mark.parametrize("make", [lambda out, bias: QuantLinear(quantized(out), torch.randn(out) if bias else None),
                                  w8a8_linear], ids=["w4", "w8a8"])
def test_joined_linears_give_each_linear_its_own_output(make):
    owner = nn.Module()
    owner.q, owner.k = make(64, True), make(32, False)
    owner.half().to(DEVICE)
    x = torch.randn(5, 128, dtype=torch.float16, device=DEVICE)
    joined = FusedLinears(owner, ("q", "k"))
    q, k = joined(x)
    assert joined._running(x) is not None  # one product ran: the linears made no view or int8 copy of their own
    assert owner.q._kernel is None and owner.q._int8 is None and owner.k._kernel is None and owner.k._int8 is None
    torch.testing.assert_close(q, owner.q(x), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(k, owner.k(x), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(DEVICE == "cpu", reason="kernel views are made on CUDA only")
def test_kernel_views_are_made_before_the_first_forward_as_it_would_make_them():
    """The runtime sizes its KV cache after `make_kernel_views`: joined groups get their one view,
    the linears outside them their own, each with its pending products' accumulator, a W8A8 linear
    its int8 copy, a W8A8 group one joined int8 copy; a forward then makes nothing more."""
    owner = nn.Module()
    owner.q, owner.k, owner.o = QuantLinear(quantized(64)), QuantLinear(quantized(32)), QuantLinear(quantized(16))
    owner.w8a8, owner.gate, owner.up = w8a8_linear(16), w8a8_linear(32), w8a8_linear(32)
    owner.joined, owner.mlp = FusedLinears(owner, ("q", "k")), FusedLinears(owner, ("gate", "up"))
    owner.half().to(DEVICE)
    make_kernel_views(owner, torch.device(DEVICE, torch.cuda.current_device()), torch.float16)
    joined, own, mlp = owner.joined._fused[1][0], owner.o._kernel[1], owner.mlp._fused[1][0]
    assert owner.q._kernel is None and owner.k._kernel is None and owner.w8a8._int8 is not None
    assert isinstance(mlp, Int8Layout) and owner.gate._int8 is None and owner.up._int8 is None
    assert joined.accumulator is not None and own.accumulator is not None
    x = torch.randn(3, 128, dtype=torch.float16, device=DEVICE)
    owner.joined(x), owner.o(x[:, :16].repeat(1, 8)), owner.mlp(x)
    assert owner.joined._fused[1][0] is joined and owner.o._kernel[1] is own  # the forward's own, not made again
    assert owner.mlp._fused[1][0] is mlp and owner.gate._int8 is None


def test_no_kernel_view_is_made_off_cuda():
    owner = nn.Module()
    owner.q, owner.k = QuantLinear(quantized(64)), QuantLinear(quantized(32))
    owner.joined = FusedLinears(owner, ("q", "k"))
    make_kernel_views(owner, torch.device("cpu"), torch.float32)
    assert owner.joined._fused is None and owner.q._kernel is None

"""Products left pending (float32 sums in the caller's accumulator) and finished by the kernels that
read them: the product's sums are its result's, each reader computes what it computes from the
finished product, and every sum it read is zero again afterwards (interpreter on the CPU, the GPU
where there is one)."""

import pytest
import torch

from qtool.kernels import elementwise
from qtool.kernels.elementwise import (
    reference_rms_norm, reference_rotary, reference_silu_mul, rotary_into_cache, triton_rms_norm, triton_silu_mul,
)
from qtool.kernels.paged_attention import store_kv
from qtool.kernels.pending import PendingSum, alike
from qtool.kernels.quant_matmul import reference, triton_matmul

from test_quant_matmul import HALF2, ONE_TOKEN, PIPELINED, SMALL, SWAPPED, relative_error, uniform_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pending(shape, dtype=torch.float16) -> PendingSum:
    """Sums as a product leaves them: float32 values off the dtype's grid."""
    return PendingSum(torch.randn(shape, device=DEVICE) * 3, dtype)


@pytest.mark.parametrize("config, m", [(dict(ONE_TOKEN, SPLIT_K=3), 1), (dict(HALF2, BLOCK_K=64, SPLIT_K=16), 1),
                                       (dict(PIPELINED, BLOCK_K=64, SPLIT_K=4), 1), (dict(HALF2, BLOCK_M=2), 3),
                                       (dict(SMALL, SPLIT_K=2), 5), (dict(SWAPPED, SPLIT_K=1), 2)])
def test_a_pending_product_sums_to_the_product(config, m):
    """Into an accumulator larger than the product (a layer's holds the most tokens a product may
    leave pending), twice: finishing sets the sums back to zero for the next call."""
    weight = uniform_weight(40, 640, 4, 64, False)
    accumulator = torch.zeros(16 * weight.out_features, device=DEVICE)
    for _ in range(2):
        x = torch.randn(m, weight.in_features, dtype=torch.float16, device=DEVICE)
        product = triton_matmul(x, weight, config=config, sums=accumulator)
        assert isinstance(product, PendingSum) and product.shape == (m, weight.out_features)
        out = product.result()
        assert out.dtype == x.dtype and relative_error(out, reference(x, weight)) < 2e-3
        assert not accumulator.any()


def test_rms_norm_finishes_what_it_reads():
    x = pending((3, 200))
    residual = torch.randn(3, 200, device=DEVICE).half()
    weight = (torch.rand(200, device=DEVICE) + 0.5).half()
    expected = reference_rms_norm(x.sums.half(), weight, 1e-5, residual)
    for got, want in zip(triton_rms_norm(x, weight, 1e-5, residual), expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert not x.sums.any()
    alone = pending((2, 96))
    expected = reference_rms_norm(alone.sums.half(), weight[:96], 1e-5)
    torch.testing.assert_close(triton_rms_norm(alone, weight[:96], 1e-5), expected, rtol=1e-3, atol=1e-5)
    assert not alone.sums.any()


def test_silu_mul_finishes_gate_and_up_as_halves_of_one_product():
    gate_up = pending((4, 2 * 1500))
    expected = reference_silu_mul(*gate_up.sums.half().split([1500, 1500], dim=-1))
    torch.testing.assert_close(triton_silu_mul(*gate_up.split([1500, 1500])), expected, rtol=1e-3, atol=1e-5)
    assert not gate_up.sums.any()


def test_rotary_into_cache_finishes_q_k_and_v(monkeypatch):
    tokens, heads, kv_heads, head_dim, blocks, block_size = 5, 6, 2, 24, 4, 4
    qkv = pending((tokens, (heads + 2 * kv_heads) * head_dim))
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    views = [part.view(tokens, -1, head_dim) for part in qkv.split(sizes)]
    finished = [part.view(tokens, -1, head_dim) for part in qkv.sums.half().split(sizes, dim=-1)]
    angles = torch.rand(tokens, head_dim // 2, device=DEVICE).repeat(1, 2) * 6
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:tokens].to(torch.int32)
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, device=DEVICE).half() for _ in range(2)]
    expected = [cache.clone() for cache in caches]
    want_q, rotated_k = reference_rotary(finished[0], finished[1], angles.cos(), angles.sin())
    store_kv(rotated_k, finished[2], *expected, slots)
    if DEVICE == "cpu":  # the interpreter
        monkeypatch.setattr(elementwise, "in_triton", lambda x: True)
    got_q = rotary_into_cache(*views, angles.cos(), angles.sin(), *caches, slots)
    for got, want in zip([got_q, *caches], [want_q, *expected]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not qkv.sums.any()


def test_a_pending_view_the_reader_cannot_address_is_finished_first():
    """One of a pair dense, or a view across tokens: the pending ones are finished (their sums zero)."""
    gate, up = pending((2, 8)), torch.randn(2, 8, device=DEVICE).half()
    expected = gate.sums.half()
    taken, (gate_out, up_out) = alike(gate, up)
    assert not taken and torch.equal(gate_out, expected) and up_out is up and not gate.sums.any()
    heads = pending((3, 4, 8))
    transposed = PendingSum(heads.sums.transpose(0, 1), heads.dtype)
    expected = transposed.sums.half()
    taken, (out,) = alike(transposed, fits=lambda sums: sums.is_contiguous())
    assert not taken and torch.equal(out, expected) and not heads.sums.any()

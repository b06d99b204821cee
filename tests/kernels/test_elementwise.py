"""The fused per-token kernels of a decoder layer against their torch references, on random inputs
of odd sizes (interpreter on the CPU, the GPU where there is one)."""

import pytest
import torch

from qtool.kernels import elementwise
from qtool.kernels.paged_attention import store_kv
from qtool.kernels.elementwise import (
    reference_rms_norm, reference_rotary, reference_silu_mul, rotary_into_cache, triton_rms_norm, triton_rotary,
    triton_silu_mul,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def poisoned(monkeypatch):
    """Outputs start as NaN: an element the kernel did not write stays NaN."""
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: torch.full(shape[0] if len(shape) == 1 else shape,
                                                                        float("nan"), **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 96), (5, 2, 24), (1, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(monkeypatch, dtype, shape, with_residual):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(dtype) if with_residual else None
    weight = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(dtype)
    expected = reference_rms_norm(x, weight, 1e-5, residual)
    poisoned(monkeypatch)
    out = triton_rms_norm(x, weight, 1e-5, residual)
    if with_residual:
        assert torch.equal(out[1], expected[1])  # the sum, rounded as torch rounds it
        out, expected = out[0], expected[0]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (3, 1, 24)])
def test_rotary_matches_the_reference(monkeypatch, dtype, heads, kv_heads, head_dim):
    tokens = 5
    q = torch.randn(tokens, heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=DEVICE).to(dtype)
    angles = torch.rand(tokens, head_dim // 2, device=DEVICE).repeat(1, 2) * 6
    cos, sin = angles.cos(), angles.sin()
    expected = reference_rotary(q, k, cos, sin)
    poisoned(monkeypatch)
    for out, want in zip(triton_rotary(q, k, cos, sin), expected):
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])  # float64: the kernels name every dtype they take
def test_silu_mul_matches_the_reference(monkeypatch, dtype):
    gate = (torch.randn(3, 1500, device=DEVICE) * 4).to(dtype)  # more than one block, a tail
    up = torch.randn(3, 1500, device=DEVICE).to(dtype)
    expected = reference_silu_mul(gate, up)
    poisoned(monkeypatch)
    torch.testing.assert_close(triton_silu_mul(gate, up), expected, rtol=1e-5 if dtype == torch.float32 else 1e-3,
                               atol=1e-5)


def test_rotary_reads_q_and_k_as_slices_of_one_product():
    """q, k, v come as views of one [T, (heads + 2 kv_heads) * head_dim] product."""
    tokens, heads, kv_heads, head_dim = 3, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    angles = torch.rand(tokens, head_dim // 2, device=DEVICE).repeat(1, 2)
    for out, want in zip(triton_rotary(q, k, angles.cos(), angles.sin()),
                         reference_rotary(q.contiguous(), k.contiguous(), angles.cos(), angles.sin())):
        assert out.is_contiguous()
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_into_cache_stores_what_rotary_and_store_kv_store(monkeypatch, dtype):
    """q, k, v as views of one product; the keys rotated and the values land in their slots, every
    other slot keeps what it held, and q comes back rotated as `rotary` rotates it."""
    tokens, heads, kv_heads, head_dim, blocks, block_size = 5, 6, 2, 24, 4, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    angles = torch.rand(tokens, head_dim // 2, device=DEVICE).repeat(1, 2) * 6
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:tokens].to(torch.int32)  # as the engine's
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, device=DEVICE).to(dtype) for _ in range(2)]
    expected = [cache.clone() for cache in caches]
    want_q, rotated_k = reference_rotary(q, k, angles.cos(), angles.sin())
    store_kv(rotated_k, v, *expected, slots)
    if DEVICE == "cpu":  # the interpreter
        monkeypatch.setattr(elementwise, "in_triton", lambda x: True)
    got_q = rotary_into_cache(q, k, v, angles.cos(), angles.sin(), *caches, slots)
    assert got_q.is_contiguous()
    for got, want in zip([got_q, *caches], [want_q, *expected]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_silu_mul_reads_gate_and_up_as_halves_of_one_product():
    gate_up = torch.randn(4, 2 * 300, device=DEVICE)
    gate, up = gate_up.split([300, 300], dim=-1)
    torch.testing.assert_close(triton_silu_mul(gate, up), reference_silu_mul(gate.contiguous(), up.contiguous()),
                               rtol=1e-5, atol=1e-5)

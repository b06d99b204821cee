"""The paged decode and prefill kernels against their torch references on random caches: GQA
groups, contexts that end inside a block, block tables out of order, new tokens after a cached
prefix (interpreter on the CPU, the GPU where there is one)."""

import pytest
import torch

from qtool.kernels.paged_attention import (
    FP8, FP8_MAX, KVScales, gather_context, reference_decode, reference_prefill, store_kv, triton_decode,
    triton_prefill,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_cache(blocks=12, block_size=8, kv_heads=2, head_dim=32, dtype=torch.float32):
    shape = (blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, dtype=dtype, device=DEVICE), torch.randn(shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("partitions", [1, 3, 7])  # 7: more than a sequence has blocks, so some shares are empty
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (6, 2, 24), (3, 3, 16), (8, 1, 64)])
def test_decode_kernel_matches_the_reference(heads, kv_heads, head_dim, partitions):
    k_cache, v_cache = random_cache(kv_heads=kv_heads, head_dim=head_dim)
    tables = torch.stack([torch.randperm(12, device=DEVICE)[:5] for _ in range(3)]).to(torch.int32)
    lengths = torch.tensor([1, 17, 40], dtype=torch.int32, device=DEVICE)  # inside, across and at block ends
    q = torch.randn(3, heads, head_dim, device=DEVICE)
    expected = reference_decode(q, k_cache, v_cache, tables, lengths, head_dim**-0.5)
    out = triton_decode(q, k_cache, v_cache, tables, lengths, head_dim**-0.5, partitions=partitions)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE == "cpu", reason="half precision is checked on the GPU")
def test_decode_kernel_in_half_precision():
    k_cache, v_cache = random_cache(dtype=torch.float16)
    tables = torch.arange(12, device=DEVICE, dtype=torch.int32).view(2, 6)
    lengths = torch.tensor([33, 48], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE, dtype=torch.float16)
    expected = reference_decode(q, k_cache, v_cache, tables, lengths, 0.2)
    for partitions in (None, 1, 4):  # None: as many as the GPU's multiprocessors call for
        torch.testing.assert_close(triton_decode(q, k_cache, v_cache, tables, lengths, 0.2, partitions=partitions),
                                   expected, atol=2e-3, rtol=2e-3)


def test_stored_tokens_are_read_back_in_order():
    k_cache, v_cache = random_cache()
    table = torch.tensor([7, 2, 9], dtype=torch.int32, device=DEVICE)
    keys, values = torch.randn(20, 2, 32, device=DEVICE), torch.randn(20, 2, 32, device=DEVICE)
    slots = torch.tensor([table[p // 8] * 8 + p % 8 for p in range(20)], device=DEVICE)
    store_kv(keys, values, k_cache, v_cache, slots)
    assert torch.equal(gather_context(k_cache, table, 20), keys)
    assert torch.equal(gather_context(v_cache, table, 20), values)


# (new tokens, context length) per sequence: a whole prompt; a chunk after a prefix, more than one
# tile of queries and of keys; one token; a prompt ending inside a block
PREFILL = [(5, 5), (70, 90), (1, 17), (9, 9)]


def prefill_inputs(heads, kv_heads, head_dim, dtype, cache_dtype=None):
    blocks, block_size = 24, 8
    k_cache, v_cache = random_cache(blocks, block_size, kv_heads, head_dim, dtype)
    if cache_dtype == FP8:
        k_cache, v_cache = ((cache * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8) for cache in (k_cache, v_cache))
    tables = torch.stack([torch.randperm(blocks, device=DEVICE)[:12] for _ in PREFILL]).to(torch.int32)
    lengths = torch.tensor([length for _, length in PREFILL], dtype=torch.int32, device=DEVICE)
    starts = [0]
    for new, _ in PREFILL:
        starts.append(starts[-1] + new)
    q = torch.randn(starts[-1], heads, head_dim, device=DEVICE).to(dtype)
    return q, k_cache, v_cache, tables, lengths, starts


HALF = DEVICE == "cuda"  # the kernel's products run in the activations' dtype: fp16 on the GPU


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (6, 2, 24), (2, 2, 16)])
def test_prefill_kernel_matches_the_reference(heads, kv_heads, head_dim):
    dtype = torch.float16 if HALF else torch.float32
    q, k_cache, v_cache, tables, lengths, starts = prefill_inputs(heads, kv_heads, head_dim, dtype)
    expected = reference_prefill(q, k_cache, v_cache, tables, lengths, starts, head_dim**-0.5)
    out = triton_prefill(q, k_cache, v_cache, tables, lengths, starts, head_dim**-0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=2e-3 if HALF else 1e-4, rtol=2e-3 if HALF else 1e-4)
    held = torch.tensor(starts, dtype=torch.int32, device=DEVICE)  # as an engine step holds them for every layer
    assert torch.equal(triton_prefill(q, k_cache, v_cache, tables, lengths, starts, head_dim**-0.5, starts=held), out)


def test_prefill_kernel_on_a_float8_cache():
    dtype = torch.float16 if HALF else torch.float32
    q, k_cache, v_cache, tables, lengths, starts = prefill_inputs(4, 2, 32, dtype, FP8)
    scales = KVScales(torch.rand(2, device=DEVICE) * 0.02 + 0.001, torch.rand(2, device=DEVICE) * 0.02 + 0.001)
    expected = reference_prefill(q, k_cache, v_cache, tables, lengths, starts, 32**-0.5, scales)
    out = triton_prefill(q, k_cache, v_cache, tables, lengths, starts, 32**-0.5, scales)
    torch.testing.assert_close(out, expected, atol=2e-3 if HALF else 1e-4, rtol=2e-3 if HALF else 1e-4)

"""Attention of one new token per sequence over its keys and values in a paged KV cache.

The cache of one layer is two tensors [blocks, block_size, kv_heads, head_dim]; a sequence's
tokens live in the blocks its row of `block_tables` lists, in order, `context_lens` of them in all.
Query heads are grouped over key/value heads (GQA: head h reads kv head h // (heads / kv_heads)).

A cache may hold float8 (e4m3) instead of the activations' dtype: twice the tokens in the same
memory. Each kv head then has a scale for keys and one for values (`KVScales`): the cache holds
x / scale, saturated to e4m3's +-448, and readers multiply it back. An fp16/bf16/fp32 cache takes
no scales and holds the values as they are.

- `store_kv`: writes new tokens' keys and values into their cache slots (block * block_size +
  offset). One `index_copy_` per tensor: a single fused device kernel already, so it has no Triton
  twin.
- `reference_decode`: the plain-torch definition: softmax in float32 of q.k * scale over the
  sequence's tokens, times v.
- `triton_decode`: one program per (sequence, kv head, partition) computes all the query heads of
  that group over its partition's share of the sequence's blocks, walking them through the block
  table with an online softmax in float32; with a float8 cache, the key scale is folded into q and
  the value scale into the output, so the loop reads one byte per element and multiplies nothing
  more. Few sequences split each sequence's blocks among partitions (flash-decoding), so that
  every multiprocessor has work; a second kernel merges the partitions' maxima, sums and
  weighted values. The partition count depends only on the batch's shape, never on the lengths,
  so a decode step can be captured in a CUDA graph.
- `paged_decode`: the dispatcher: Triton on CUDA, the reference elsewhere or with
  QTOOL_KERNELS=reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from qtool.kernels.dispatch import triton_runs

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class KVScales(NamedTuple):
    """One layer's float32 scales of a float8 cache, [kv_heads] each."""

    keys: torch.Tensor
    values: torch.Tensor


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """x [T, kv_heads, head_dim] as the cache stores it: divided by its head's scale and saturated
    for a float8 cache, cast otherwise."""
    if dtype != FP8:
        return x.to(dtype)
    return (x.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def from_cache(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached [..., kv_heads, head_dim] back in float32 (float8: times its head's scale)."""
    return x.float() * scale[:, None] if x.dtype == FP8 else x.float()


def round_trip(x: torch.Tensor, dtype: torch.dtype | None, scale: torch.Tensor | None) -> torch.Tensor:
    """What reading x back from a cache of `dtype` gives, in x's dtype."""
    return from_cache(to_cache(x, dtype, scale), scale).to(x.dtype) if dtype == FP8 else x


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, scales: KVScales | None = None) -> None:
    """key, value [T, kv_heads, head_dim] into the cache slots [T]."""
    slots = slots.long()
    keys_scale, values_scale = scales if scales is not None else (None, None)
    for cache, x, scale in ((k_cache, key, keys_scale), (v_cache, value, values_scale)):
        stored = to_cache(x, cache.dtype, scale)
        if cache.dtype == FP8:  # index_copy_ has no float8 kernels: copy the bytes
            cache, stored = cache.view(torch.uint8), stored.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, stored)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached tokens [length, kv_heads, head_dim], in order, as stored."""
    blocks = block_table[: -(-length // cache.shape[1])].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, scales: KVScales | None = None) -> torch.Tensor:
    """q [S, heads, head_dim] -> [S, heads, head_dim] in q's dtype."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    keys_scale, values_scale = scales if scales is not None else (None, None)
    out = torch.empty_like(q)
    for s, length in enumerate(context_lens.tolist()):
        keys = from_cache(gather_context(k_cache, block_tables[s], length), keys_scale)
        values = from_cache(gather_context(v_cache, block_tables[s], length), values_scale)
        keys, values = keys.repeat_interleave(heads // kv_heads, dim=1), values.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[s].float(), keys) * scale
        out[s] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), values).to(q.dtype)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, scales: KVScales | None = None) -> torch.Tensor:
    if triton_runs(q):
        return triton_decode(q, k_cache, v_cache, block_tables, context_lens, scale, scales)
    return reference_decode(q, k_cache, v_cache, block_tables, context_lens, scale, scales)


MAX_PARTITIONS = 16
PROGRAMS_PER_MULTIPROCESSOR = 2


def decode_partitions(sequences: int, kv_heads: int, device: torch.device) -> int:
    """How many partitions each sequence's blocks are split among: enough for about two programs a
    multiprocessor, at most MAX_PARTITIONS; 1 (no split) when the batch fills the GPU alone."""
    if device.type != "cuda":
        return 1
    programs = PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(device.index if device.index is not None else
                                                              torch.cuda.current_device())
    return max(1, min(MAX_PARTITIONS, programs // (sequences * kv_heads)))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, scales: KVScales | None = None,
                  partitions: int | None = None) -> torch.Tensor:
    """`partitions` fixes the split (tests); None chooses it by the batch's shape."""
    sequences, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    partitions = partitions or decode_partitions(sequences, kv_heads, q.device)
    q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    fp8 = k_cache.dtype == FP8
    keys_scale, values_scale = (scales.keys.float().contiguous(), scales.values.float().contiguous()) if fp8 else (q, q)
    out = torch.empty_like(q)
    split = partitions > 1
    # per (sequence, head, partition): the running maximum, the sum of weights and the weighted values
    maxima = torch.empty(sequences, heads, partitions, device=q.device, dtype=torch.float32) if split else out
    sums = torch.empty_like(maxima) if split else out
    values = torch.empty(sequences, heads, partitions, head_dim, device=q.device, dtype=torch.float32) if split else out
    shape = dict(HEADS=heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim))
    _decode_kernel[(sequences, kv_heads, partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, maxima, sums, values, scale, keys_scale, values_scale,
        block_tables.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, SCALED=fp8,
        SPLIT=split, **shape,
    )
    if split:
        _merge_kernel[(sequences, heads)](maxima, sums, values, out, PARTITIONS=partitions,
                                          PARTITIONS_PAD=triton.next_power_of_2(partitions), **shape)
    return out


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, max_ptr, sum_ptr, values_ptr, scale,
                       k_scale_ptr, v_scale_ptr, max_blocks, stride_block, stride_token, stride_head,
                       HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SCALED: tl.constexpr,
                       SPLIT: tl.constexpr):
        """The attention of one kv head's query heads over one partition's share of a sequence's
        blocks: the output itself, or (SPLIT) the share's maximum, sum of weights and weighted
        values for `_merge_kernel` (an empty share: -inf, 0, 0)."""
        sequence, kv_head, partition = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
        in_group = tl.arange(0, GROUP_PAD) < GROUP
        dims = tl.arange(0, HEAD_DIM_PAD)
        in_dim = dims < HEAD_DIM
        q = tl.load(q_ptr + (sequence * HEADS + heads)[:, None] * HEAD_DIM + dims[None, :],
                    mask=in_group[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
        if SCALED:
            scale = scale * tl.load(k_scale_ptr + kv_head)
        length = tl.load(lens_ptr + sequence)
        best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), tl.float32)
        tokens = tl.arange(0, BLOCK_SIZE)
        blocks = tl.cdiv(length, BLOCK_SIZE)
        share = tl.cdiv(blocks, tl.num_programs(2))
        for index in range(partition * share, tl.minimum((partition + 1) * share, blocks)):
            block = tl.load(tables_ptr + sequence * max_blocks + index).to(tl.int64)
            offsets = block * stride_block + tokens[:, None] * stride_token + kv_head * stride_head + dims[None, :]
            present = (index * BLOCK_SIZE + tokens) < length
            keys = tl.load(k_ptr + offsets, mask=present[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
            values = tl.load(v_ptr + offsets, mask=present[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2) * scale  # [group, tokens]
            scores = tl.where(present[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_best[:, None])
            correction = tl.exp(best - new_best)
            total = total * correction + tl.sum(weights, axis=1)
            acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
            best = new_best
        if SCALED:
            acc = acc * tl.load(v_scale_ptr + kv_head)
        mask = in_group[:, None] & in_dim[None, :]
        if SPLIT:
            rows = (sequence * HEADS + heads) * tl.num_programs(2) + partition
            tl.store(max_ptr + rows, best, mask=in_group)
            tl.store(sum_ptr + rows, total, mask=in_group)
            tl.store(values_ptr + rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=mask)
        else:
            tl.store(out_ptr + (sequence * HEADS + heads)[:, None] * HEAD_DIM + dims[None, :],
                     (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_kernel(max_ptr, sum_ptr, values_ptr, out_ptr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HEAD_DIM_PAD: tl.constexpr, PARTITIONS: tl.constexpr, PARTITIONS_PAD: tl.constexpr):
        """One (sequence, head)'s output from its partitions: each share's sums rescaled to the
        overall maximum (empty shares weigh nothing), the values over the sum."""
        row = tl.program_id(0) * HEADS + tl.program_id(1)
        parts = tl.arange(0, PARTITIONS_PAD)
        present = parts < PARTITIONS
        dims = tl.arange(0, HEAD_DIM_PAD)
        in_dim = dims < HEAD_DIM
        maxima = tl.load(max_ptr + row * PARTITIONS + parts, mask=present, other=float("-inf"))
        weights = tl.where(maxima > float("-inf"), tl.exp(maxima - tl.max(maxima, axis=0)), 0.0)
        total = tl.sum(weights * tl.load(sum_ptr + row * PARTITIONS + parts, mask=present, other=0.0), axis=0)
        values = tl.load(values_ptr + (row * PARTITIONS + parts)[:, None] * HEAD_DIM + dims[None, :],
                         mask=present[:, None] & in_dim[None, :], other=0.0)
        out = tl.sum(weights[:, None] * values, axis=0) / total
        tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=in_dim)

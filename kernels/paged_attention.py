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
- `triton_decode`: one program per (sequence, kv head) computes all the query heads of that group,
  walking the sequence's blocks through its block table with an online softmax in float32; with
  a float8 cache, the key scale is folded into q and the value scale into the output, so the
  loop reads one byte per element and multiplies nothing more.
- `paged_decode`: the dispatcher: Triton on CUDA, the reference elsewhere or with
  QTOOL_KERNELS=reference.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

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
    if triton is not None and q.is_cuda and os.environ.get("QTOOL_KERNELS") != "reference":
        return triton_decode(q, k_cache, v_cache, block_tables, context_lens, scale, scales)
    return reference_decode(q, k_cache, v_cache, block_tables, context_lens, scale, scales)


def triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, scales: KVScales | None = None) -> torch.Tensor:
    sequences, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    fp8 = k_cache.dtype == FP8
    keys_scale, values_scale = (scales.keys.float().contiguous(), scales.values.float().contiguous()) if fp8 else (q, q)
    out = torch.empty_like(q)
    _decode_kernel[(sequences, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale, keys_scale, values_scale,
        block_tables.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEADS=heads, GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), SCALED=fp8,
    )
    return out


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale, k_scale_ptr, v_scale_ptr,
                       max_blocks, stride_block, stride_token, stride_head,
                       HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SCALED: tl.constexpr):
        sequence, kv_head = tl.program_id(0), tl.program_id(1)
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
        for index in range(0, tl.cdiv(length, BLOCK_SIZE)):
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
        out = acc / total[:, None]
        if SCALED:
            out = out * tl.load(v_scale_ptr + kv_head)
        tl.store(out_ptr + (sequence * HEADS + heads)[:, None] * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=in_group[:, None] & in_dim[None, :])

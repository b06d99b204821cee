"""Attention of one new token per sequence over its keys and values in a paged KV cache.

The cache of one layer is two tensors [blocks, block_size, kv_heads, head_dim]; a sequence's
tokens live in the blocks its row of `block_tables` lists, in order, `context_lens` of them in all.
Query heads are grouped over key/value heads (GQA: head h reads kv head h // (heads / kv_heads)).

- `store_kv`: writes new tokens' keys and values into their cache slots (block * block_size +
  offset). One `index_copy_` per tensor: a single fused device kernel already, so it has no Triton
  twin.
- `reference_decode`: the plain-torch definition: softmax in float32 of q.k * scale over the
  sequence's tokens, times v.
- `triton_decode`: one program per (sequence, kv head) computes all the query heads of that group,
  walking the sequence's blocks through its block table with an online softmax in float32.
- `paged_decode`: the dispatcher: Triton on CUDA, the reference elsewhere or with
  QTOOL_KERNELS=reference.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """key, value [T, kv_heads, head_dim] into the cache slots [T]."""
    slots = slots.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached tokens [length, kv_heads, head_dim], in order."""
    blocks = block_table[: -(-length // cache.shape[1])].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, heads, head_dim] -> [S, heads, head_dim] in q's dtype."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for s, length in enumerate(context_lens.tolist()):
        keys = gather_context(k_cache, block_tables[s], length).float().repeat_interleave(heads // kv_heads, dim=1)
        values = gather_context(v_cache, block_tables[s], length).float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[s].float(), keys) * scale
        out[s] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), values).to(q.dtype)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if triton is not None and q.is_cuda and os.environ.get("QTOOL_KERNELS") != "reference":
        return triton_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    return reference_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


def triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    sequences, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    out = torch.empty_like(q)
    _decode_kernel[(sequences, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        block_tables.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEADS=heads, GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )
    return out


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
                       max_blocks, stride_block, stride_token, stride_head,
                       HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
        sequence, kv_head = tl.program_id(0), tl.program_id(1)
        heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
        in_group = tl.arange(0, GROUP_PAD) < GROUP
        dims = tl.arange(0, HEAD_DIM_PAD)
        in_dim = dims < HEAD_DIM
        q = tl.load(q_ptr + (sequence * HEADS + heads)[:, None] * HEAD_DIM + dims[None, :],
                    mask=in_group[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
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
        tl.store(out_ptr + (sequence * HEADS + heads)[:, None] * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=in_group[:, None] & in_dim[None, :])

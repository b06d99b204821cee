"""Attention of one new token per sequence over its keys and values in a paged KV cache.

The cache of one layer is two tensors [blocks, block_size, kv_heads, head_dim]; a sequence's
tokens live in the blocks its row of `block_tables` lists, in order, `context_lens` of them in all.
Query heads are grouped over key/value heads (GQA: head h reads kv head h // (heads / kv_heads)).

A cache may hold float8 (e4m3) instead of the activations' dtype: twice the tokens in the same
memory. Each kv head then has a scale for keys and one for values (`KVScales`): the cache holds
x / scale, saturated to e4m3's +-448, and readers multiply it back. An fp16/bf16/fp32 cache takes
no scales and holds the values as they are.

- `store_kv`: writes new tokens' keys and values into their cache slots (block * block_size +
  offset), one `index_copy_` per tensor. Where the cache holds the activations' dtype and nothing
  observes the keys, the runtime stores them from the rotary kernel instead
  (`qtool.kernels.elementwise.rotary_into_cache`), which this is the reference of.
- `reference_decode`: the plain-torch definition: softmax in float32 of q.k * scale over the
  sequence's tokens, times v.
- `triton_decode`: one program per (sequence, kv head, partition) computes all the query heads of
  that group over its partition's share of the sequence's blocks, walking them through the block
  table with an online softmax in float32, the group's heads the rows of tensor-core products;
  with a float8 cache, the key scale is folded into the score scale and the value scale into the
  output, so the loop reads one byte per element and multiplies nothing more. Few sequences split
  each sequence's blocks among partitions (flash-decoding), so that every multiprocessor has
  work; a second kernel merges the partitions' maxima, sums and weighted values. The partition
  count depends only on the batch's shape, never on the lengths, so a decode step can be captured
  in a CUDA graph.
- `paged_decode`: the dispatcher: Triton on CUDA, the reference elsewhere or with
  QTOOL_KERNELS=reference.
- `reference_prefill` / `triton_prefill` / `paged_prefill`: several new tokens per sequence (a
  prompt, a chunk of one, or what a cached prefix leaves), each the last of its sequence's
  context, attending causally to the whole context. The kernel reads K and V through the block
  tables like the decode kernel (no gathered copy), one program per (sequence, head, tile of
  queries), the products on the tensor cores in the activations' dtype (flash-attention style:
  float32 scores and online softmax, weights rounded to that dtype for the second product); the
  reference gathers each context and calls torch's attention.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qtool.kernels.dependent_launch import dependent_launch
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


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., kv_heads, d] -> [..., heads, d]: each kv head serves heads / kv_heads query heads."""
    return x.repeat_interleave(heads // x.shape[-2], dim=-2)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached tokens [length, kv_heads, head_dim], in order, as stored."""
    blocks = block_table[: -(-length // cache.shape[1])].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, scales: KVScales | None = None) -> torch.Tensor:
    """q [S, heads, head_dim] -> [S, heads, head_dim] in q's dtype."""
    heads = q.shape[1]
    keys_scale, values_scale = scales if scales is not None else (None, None)
    out = torch.empty_like(q)
    for s, length in enumerate(context_lens.tolist()):
        keys = from_cache(gather_context(k_cache, block_tables[s], length), keys_scale)
        values = from_cache(gather_context(v_cache, block_tables[s], length), values_scale)
        keys, values = repeat_kv(keys, heads), repeat_kv(values, heads)
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
DECODE_TILE = 64  # tokens (whole blocks) an iteration of the decode kernel


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' tensor-core products: float32 inputs exactly ("ieee": no TF32 rounding), fp16
    and bf16 as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


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
    shape = dict(HEADS=heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)))
    launch = dependent_launch(q.device)
    _decode_kernel[(sequences, kv_heads, partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, maxima, sums, values, scale, keys_scale, values_scale,
        block_tables.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, TILE=DECODE_TILE,
        PRECISION=dot_precision(q.dtype), SCALED=fp8, SPLIT=split, **shape, **launch,
    )
    if split:
        _merge_kernel[(sequences, heads)](maxima, sums, values, out, PARTITIONS=partitions,
                                          PARTITIONS_PAD=triton.next_power_of_2(partitions), **shape, **launch)
    return out


def reference_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, query_starts: list[int], scale: float,
                      scales: KVScales | None = None) -> torch.Tensor:
    """q [T, heads, head_dim]: sequence s's new tokens are rows query_starts[s]:query_starts[s + 1],
    the last positions of its context_lens[s] tokens in the cache. -> [T, heads, head_dim]."""
    keys_scale, values_scale = scales if scales is not None else (None, None)
    heads = q.shape[1]
    out = torch.empty_like(q)
    for s, length in enumerate(context_lens.tolist()):
        first, last = query_starts[s], query_starts[s + 1]
        keys = from_cache(gather_context(k_cache, block_tables[s], length), keys_scale)
        values = from_cache(gather_context(v_cache, block_tables[s], length), values_scale)
        keys, values = repeat_kv(keys, heads).transpose(0, 1), repeat_kv(values, heads).transpose(0, 1)
        new = last - first
        positions = torch.arange(length - new, length, device=q.device)  # of the queries
        mask = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(q[first:last].transpose(0, 1), keys.to(q.dtype), values.to(q.dtype),
                                                  attn_mask=mask, scale=scale)
        out[first:last] = attended.transpose(0, 1)
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, query_starts: list[int], scale: float,
                  scales: KVScales | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
    """`starts`: query_starts already on q's device (int32), for the kernel."""
    if triton_runs(q):
        return triton_prefill(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale, scales, starts)
    return reference_prefill(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale, scales)


PREFILL_TILE = 64  # queries a program, and keys an iteration


def triton_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, query_starts: list[int], scale: float,
                   scales: KVScales | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
    """`starts`: query_starts already on q's device (int32); copied there otherwise."""
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    fp8 = k_cache.dtype == FP8
    keys_scale, values_scale = (scales.keys.float().contiguous(), scales.values.float().contiguous()) if fp8 else (q, q)
    q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    if starts is None:
        starts = torch.tensor(query_starts, dtype=torch.int32, device=q.device)
    longest = max(last - first for first, last in zip(query_starts, query_starts[1:]))
    out = torch.empty_like(q)
    _prefill_kernel[(len(query_starts) - 1, heads, triton.cdiv(longest, PREFILL_TILE))](
        q, k_cache, v_cache, block_tables, context_lens, starts, out, scale, keys_scale, values_scale,
        block_tables.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEADS=heads, GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), TILE=PREFILL_TILE, PRECISION=dot_precision(q.dtype),
        SCALED=fp8, num_warps=4, num_stages=2)
    return out


if triton is not None:
    from qtool.kernels.dependent_launch import wait_for_previous

    @triton.jit
    def _attend(q, k_ptr, v_ptr, table_ptr, kv_head, start, end, positions, scale, best, total, acc, stride_block,
                stride_token, stride_head, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr):
        """The online-softmax state (row maxima in log2 units, sums of weights, weighted values) of
        the query rows q, moved on by one sequence's keys [start, min(start + TILE, end)) of one kv
        head, found through its block-table row `table_ptr`; CAUSAL: row r sees the keys at
        positions <= positions[r] only. `scale` includes log2(e)."""
        dtype = q.dtype
        dims = tl.arange(0, HEAD_DIM_PAD)
        keys_at = start + tl.arange(0, TILE)
        in_keys = keys_at < end
        block = tl.load(table_ptr + keys_at // BLOCK_SIZE, mask=in_keys, other=0)
        offsets = (block.to(tl.int64) * stride_block + (keys_at % BLOCK_SIZE) * stride_token
                   + kv_head * stride_head)[:, None] + dims[None, :]
        mask = in_keys[:, None] & (dims < HEAD_DIM)[None, :]
        keys = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(dtype)
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
        visible = in_keys[None, :]
        if CAUSAL:
            visible = visible & (keys_at[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp2(scores - new_best[:, None])
        correction = tl.exp2(best - new_best)
        total = total * correction + tl.sum(weights, axis=1)
        values = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(dtype)
        acc = acc * correction[:, None] + tl.dot(weights.to(dtype), values, input_precision=PRECISION)
        return new_best, total, acc

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, max_ptr, sum_ptr, values_ptr, scale,
                       k_scale_ptr, v_scale_ptr, max_blocks, stride_block, stride_token, stride_head,
                       HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr,
                       PRECISION: tl.constexpr, SCALED: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
        """The attention of one kv head's query heads over one partition's share of a sequence's
        blocks, TILE tokens an iteration read through the block table: the output itself, or
        (SPLIT) the share's maximum, sum of weights and weighted values for `_merge_kernel` (an
        empty share: -inf, 0, 0). The group's heads are the rows of both products on the tensor
        cores (padded to GROUP_PAD >= 16), as in `_prefill_kernel`."""
        wait_for_previous(PDL)
        sequence, kv_head, partition = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
        in_group = tl.arange(0, GROUP_PAD) < GROUP
        dims = tl.arange(0, HEAD_DIM_PAD)
        in_dim = dims < HEAD_DIM
        q = tl.load(q_ptr + (sequence * HEADS + heads)[:, None] * HEAD_DIM + dims[None, :],
                    mask=in_group[:, None] & in_dim[None, :], other=0.0)
        if SCALED:
            scale = scale * tl.load(k_scale_ptr + kv_head)
        scale = scale * 1.4426950408889634  # log2(e): exp2 below
        length = tl.load(lens_ptr + sequence)
        best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), tl.float32)
        share = tl.cdiv(tl.cdiv(length, BLOCK_SIZE), tl.num_programs(2)) * BLOCK_SIZE  # whole blocks
        end = tl.minimum((partition + 1) * share, length)
        for start in range(partition * share, end, TILE):
            best, total, acc = _attend(q, k_ptr, v_ptr, tables_ptr + sequence * max_blocks, kv_head, start, end, 0,
                                       scale, best, total, acc, stride_block, stride_token, stride_head, BLOCK_SIZE,
                                       HEAD_DIM, HEAD_DIM_PAD, TILE, PRECISION, False)
        if SCALED:
            acc = acc * tl.load(v_scale_ptr + kv_head)
        mask = in_group[:, None] & in_dim[None, :]
        if SPLIT:  # the maximum back in natural-log units for the merge
            rows = (sequence * HEADS + heads) * tl.num_programs(2) + partition
            tl.store(max_ptr + rows, best * 0.6931471805599453, mask=in_group)
            tl.store(sum_ptr + rows, total, mask=in_group)
            tl.store(values_ptr + rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=mask)
        else:
            tl.store(out_ptr + (sequence * HEADS + heads)[:, None] * HEAD_DIM + dims[None, :],
                     (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_kernel(max_ptr, sum_ptr, values_ptr, out_ptr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HEAD_DIM_PAD: tl.constexpr, PARTITIONS: tl.constexpr, PARTITIONS_PAD: tl.constexpr,
                      PDL: tl.constexpr):
        """One (sequence, head)'s output from its partitions: each share's sums rescaled to the
        overall maximum (empty shares weigh nothing), the values over the sum."""
        wait_for_previous(PDL)
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

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, starts_ptr, out_ptr, scale, k_scale_ptr,
                        v_scale_ptr, max_blocks, stride_block, stride_token, stride_head,
                        HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
                        SCALED: tl.constexpr):
        """One head of one tile of a sequence's new tokens (queries), over the keys up to the tile's
        last position, TILE keys an iteration read through the block table; a tile past the
        sequence's new tokens does nothing. Scores and softmax in float32 (base 2, the scale
        folded in), the weights rounded to the activations' dtype for their product with V."""
        sequence, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(starts_ptr + sequence)
        new = tl.load(starts_ptr + sequence + 1) - first
        if tile * TILE < new:
            dtype = q_ptr.dtype.element_ty
            kv_head = head // GROUP
            length = tl.load(lens_ptr + sequence)
            rows = tile * TILE + tl.arange(0, TILE)
            positions = length - new + rows  # of the queries in the sequence
            dims = tl.arange(0, HEAD_DIM_PAD)
            in_dim = dims < HEAD_DIM
            q = tl.load(q_ptr + ((first + rows) * HEADS + head)[:, None] * HEAD_DIM + dims[None, :],
                        mask=(rows < new)[:, None] & in_dim[None, :], other=0.0)
            if SCALED:
                scale = scale * tl.load(k_scale_ptr + kv_head)
            scale = scale * 1.4426950408889634  # log2(e): exp2 below
            best = tl.full((TILE,), float("-inf"), tl.float32)
            total = tl.zeros((TILE,), tl.float32)
            acc = tl.zeros((TILE, HEAD_DIM_PAD), tl.float32)
            end = length - new + tl.minimum(new, (tile + 1) * TILE)  # keys [0, end) can be seen
            for start in range(0, end, TILE):
                best, total, acc = _attend(q, k_ptr, v_ptr, tables_ptr + sequence * max_blocks, kv_head, start, end,
                                           positions, scale, best, total, acc, stride_block, stride_token,
                                           stride_head, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, TILE, PRECISION, True)
            if SCALED:
                acc = acc * tl.load(v_scale_ptr + kv_head)
            tl.store(out_ptr + ((first + rows) * HEADS + head)[:, None] * HEAD_DIM + dims[None, :],
                     (acc / total[:, None]).to(dtype), mask=(rows < new)[:, None] & in_dim[None, :])

"""Attention as the model code calls it: causal within whole windows, or through the paged KV cache.

A `PagedBatch` describes one engine step: the new tokens of several sequences, flattened, and for
each sequence where they start, how long its context is once they are added, and its block table.
Their keys and values are written to the cache first (by `paged_attention`, or by the rotary
kernel before `cached_attention`); then each sequence's queries attend to its whole context: a
step where every sequence adds one token (decode) goes through the paged decode kernel; otherwise
(prefill, chunked prefill, mixed) through the paged prefill kernel, each sequence's new tokens
attending causally to its whole context (`qtool.kernels.paged_attention`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qtool.kernels.paged_attention import KVScales, paged_decode, paged_prefill, repeat_kv, store_kv


@dataclass
class KVCache:
    """Keys and values of every layer: [layers, blocks, block_size, kv_heads, head_dim] each, in
    the activations' dtype or in float8 (`qtool.kernels.paged_attention`: one byte per element,
    with each attention layer's per-head scales)."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def allocate(cls, layers: int, blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (layers, blocks, block_size, kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_block(layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * dtype.itemsize


@dataclass
class PagedBatch:
    """One step's attention inputs. `query_starts` [S + 1]: where each sequence's new tokens start
    in the flattened batch; `context_lens` [S]: its tokens in the cache once they are added;
    `block_tables` [S, max blocks] (int32, padded); `slots` [T]: the cache slot of each new token;
    `starts`: `query_starts` already on the device (int32), where the caller uploaded it."""

    cache: KVCache
    slots: torch.Tensor
    query_starts: list[int]
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    starts: torch.Tensor | None = None

    @property
    def decode(self) -> bool:
        return len(self.query_starts) - 1 == self.query_starts[-1]

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values [blocks, block_size, kv_heads, head_dim]."""
        return self.cache.keys[layer], self.cache.values[layer]

    @functools.cached_property
    def device_query_starts(self) -> torch.Tensor:
        """`query_starts` as int32 on the batch's device: copied once a step, for every layer."""
        if self.starts is not None:
            return self.starts
        return torch.tensor(self.query_starts, dtype=torch.int32, device=self.slots.device)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """Windows of `length` tokens flattened: q [B * L, heads, d], k and v [B * L, kv_heads, d]."""
    heads = q.shape[1]

    def windows(x):
        return x.view(-1, length, *x.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(windows(q), windows(repeat_kv(k, heads)), windows(repeat_kv(v, heads)),
                                         is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch, layer: int,
                    scale: float, scales: KVScales | None = None) -> torch.Tensor:
    """`scales`: the layer's per-head scales, for a float8 cache."""
    store_kv(k, v, *batch.layer_cache(layer), batch.slots, scales)
    return cached_attention(q, batch, layer, scale, scales)


def cached_attention(q: torch.Tensor, batch: PagedBatch, layer: int, scale: float,
                     scales: KVScales | None = None) -> torch.Tensor:
    """The step's queries over their contexts, the new tokens' keys and values already stored."""
    k_cache, v_cache = batch.layer_cache(layer)
    if batch.decode:
        return paged_decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale, scales)
    return paged_prefill(q, k_cache, v_cache, batch.block_tables, batch.context_lens, batch.query_starts, scale,
                         scales, starts=batch.device_query_starts)

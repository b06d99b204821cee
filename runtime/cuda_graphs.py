"""CUDA graphs of the decode step: one launch of a recorded graph instead of the hundreds of kernel
launches a step of eager PyTorch makes (each layer's norms, projections, rotary, cache store,
attention), which on a GPU cost more than the step's arithmetic at small batch sizes.

A graph replays fixed addresses and shapes, so each batch size gets its own graph over static
input buffers, and batches are padded up to the next captured size (1, 2, 4, 8, then steps of
16). Padding rows write their keys and values into a scratch block that no sequence owns, and
attend to that one slot. Everything the step reads that varies (token ids, positions, cache
slots, context lengths, block tables) is copied into the buffers before the replay, in two
copies from the one upload the engine makes; the paged decode kernel loops over each sequence's
own length, so a table as wide as the longest context serves every step. A size is captured on
first use, after one eager run at that size (kernels compile and tune there, never inside a
capture). The graphs share one memory pool: they never run at once, and each keeps only its
logits alive between replays.
"""

from __future__ import annotations

import torch

from qtool.runtime.attention import KVCache, PagedBatch

SMALL_SIZES = (1, 2, 4, 8)
SIZE_STEP = 16


def graph_sizes(max_sequences: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, 8, 16, 32, ... up to `max_sequences` (and it)."""
    sizes = [size for size in SMALL_SIZES if size < max_sequences]
    sizes += list(range(SIZE_STEP, max_sequences, SIZE_STEP))
    return sizes + [max_sequences]


class DecodeGraphs:
    """Captured decode steps of `model` over `cache`; `scratch_block` is a cache block outside the
    block pool, for padding rows."""

    def __init__(self, model, cache: KVCache, scratch_block: int, max_sequences: int, max_blocks: int):
        self.model, self.cache = model, cache
        self.sizes = graph_sizes(max_sequences)
        largest, device = self.sizes[-1], cache.keys.device
        block_size = cache.keys.shape[2]
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        # ids, positions, cache slots and context lengths: one row each, so that one copy fills them
        self.rows = torch.zeros(4, largest, dtype=torch.int32, device=device)
        self.ids, self.positions, self.slots, self.context_lens = self.rows
        self.slots.fill_(self.scratch_slot)
        self.context_lens.fill_(1)
        self.tables = torch.full((largest, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def size_for(self, batch: int) -> int | None:
        """The captured size a batch of `batch` decoding sequences runs at (None: too many)."""
        return next((size for size in self.sizes if size >= batch), None)

    def logits(self, inputs) -> torch.Tensor:
        """The next-token logits [size, vocab] of one decode step through the graph of its size, from
        the engine's `StepInputs` of that many rows (those past the batch's sequences decode the
        scratch slot alone). Table entries past a row's width keep older values: the kernels read
        a sequence's table only up to its length."""
        size, width = inputs.block_tables.shape
        self.rows[:, :size].copy_(inputs.flat[: 4 * size].view(4, size))
        self.tables[:size, :width].copy_(inputs.block_tables)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits

    def _step(self, size: int) -> torch.Tensor:
        batch = PagedBatch(self.cache, self.slots[:size], list(range(size + 1)), self.context_lens[:size],
                           self.tables[:size])
        hidden = self.model.forward_tokens(self.ids[:size], self.positions[:size], batch)
        return self.model.compute_logits(hidden)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._step(size)  # eager first: compilation and tuning happen outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(size)
        self.pool = graph.pool()
        return graph, logits

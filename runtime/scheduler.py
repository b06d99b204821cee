"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step first serves the running sequences (a decode token each, or the next chunk of a long
prompt), then admits waiting ones in arrival order while the step's token budget
(`max_batched_tokens`), the sequence limit and free cache blocks last; a prompt longer than what
is left of the budget is prefilled in chunks over several steps. A waiting prompt starts after
its longest cached prefix (`BlockPool.cached_prefix`). When a running sequence needs a block and
none is free, the most recently admitted other sequence is preempted: its blocks are released
and it goes back to the front of the queue, to be recomputed (prompt and output so far) when
there is room again. No request is dropped; a single sequence that cannot fit the whole cache
even alone is refused when it is added.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from qtool.errors import QtoolError
from qtool.runtime.cache import BlockPool, chained_hash
from qtool.runtime.sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request as it runs: its tokens (prompt, then output), how many of them are in the cache
    (`computed`), and the blocks holding them."""

    id: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    registered: int = 0  # leading full blocks entered in the prefix index
    last_hash: int = 0  # the chained hash of the last of them (0: none)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    preemptions: int = 0

    def __post_init__(self):
        self.tokens = list(self.prompt)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]


@dataclass
class Scheduled:
    """A sequence's share of a step: `count` tokens from position `start`; `samples` when they
    reach its last token, so the step's logits give its next one."""

    sequence: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == len(self.sequence.tokens)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batched_tokens: int = 2048, max_sequences: int = 256,
                 max_model_len: int | None = None):
        self.pool = pool
        self.max_batched_tokens, self.max_sequences = max_batched_tokens, max_sequences
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, sequence: Sequence) -> None:
        longest = len(sequence.prompt) + sequence.params.max_tokens
        if self.max_model_len is not None and longest > self.max_model_len:
            raise QtoolError(f"prompt ({len(sequence.prompt)} tokens) plus max_tokens ({sequence.params.max_tokens}) "
                             f"exceeds the model's context of {self.max_model_len} tokens")
        if -(-longest // self.pool.block_size) > self.pool.total_blocks:
            raise QtoolError(f"a request of up to {longest} tokens needs more cache than there is "
                             f"({self.pool.total_blocks * self.pool.block_size} tokens); allow more memory")
        self.waiting.append(sequence)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> list[Scheduled]:
        budget, step = self.max_batched_tokens, []
        for sequence in list(self.running):
            if budget == 0:
                break
            if sequence.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            count = min(len(sequence.tokens) - sequence.computed, budget)
            if not self._reserve(sequence, sequence.computed + count, step):
                continue
            step.append(Scheduled(sequence, sequence.computed, count))
            budget -= count
        while self.waiting and budget and len(self.running) < self.max_sequences:
            sequence = self.waiting[0]
            cached = self.pool.cached_prefix(sequence.tokens)
            start = len(cached) * self.pool.block_size
            count = min(len(sequence.tokens) - start, budget)
            needed = -(-(start + count) // self.pool.block_size) - len(cached)
            if needed > self.pool.free_blocks - sum(self.pool.counts[b] == 0 for b in cached):
                break
            self.waiting.popleft()
            self.pool.acquire(cached)
            sequence.blocks = cached + self.pool.allocate(needed)
            sequence.computed, sequence.registered = start, len(cached)
            sequence.last_hash = self.pool.hash_of[cached[-1]] if cached else 0
            sequence.status = Status.RUNNING
            self.running.append(sequence)
            step.append(Scheduled(sequence, start, count))
            budget -= count
        return step

    def extend(self, step: list[Scheduled]) -> list[Scheduled] | None:
        """The decode step after `step`, planned before its tokens are known: each sequence's next
        position, with the block it needs. None unless it is what `schedule` would plan: `step`
        decodes every running sequence, none waits, none reaches `max_tokens` with `step`'s token,
        and the blocks are free without preempting."""
        if self.waiting or len(step) != len(self.running) or any(
                item.count != 1 or item.sequence.status is not Status.RUNNING
                or len(item.sequence.output) + 2 > item.sequence.params.max_tokens for item in step):
            return None
        needed = [self._missing_blocks(item.sequence, item.start + 2) for item in step]
        if sum(needed) > self.pool.free_blocks:
            return None
        for item, count in zip(step, needed):
            item.sequence.blocks += self.pool.allocate(count)
        return [Scheduled(item.sequence, item.start + 1, 1) for item in step]

    def _reserve(self, sequence: Sequence, tokens: int, step: list[Scheduled]) -> bool:
        """Blocks for `tokens` of `sequence`, preempting later-admitted sequences as needed;
        False if `sequence` itself had to go."""
        needed = self._missing_blocks(sequence, tokens)
        while needed > self.pool.free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            step[:] = [item for item in step if item.sequence is not victim]
            if victim is sequence:
                return False
        sequence.blocks += self.pool.allocate(needed)
        return True

    def _missing_blocks(self, sequence: Sequence, tokens: int) -> int:
        """Blocks `sequence` must still get to hold `tokens` tokens."""
        return max(0, -(-tokens // self.pool.block_size) - len(sequence.blocks))

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.pool.release(sequence.blocks)
        sequence.blocks, sequence.computed, sequence.registered, sequence.last_hash = [], 0, 0, 0
        sequence.status = Status.WAITING
        sequence.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(sequence)

    def finish_step(self, step: list[Scheduled]) -> None:
        """After a step: mark its tokens computed and enter newly full blocks in the prefix index,
        each hash chained on from the last one entered (a step hashes only its new blocks)."""
        size = self.pool.block_size
        for item in step:
            sequence = item.sequence
            sequence.computed = item.start + item.count
            for index in range(sequence.registered, sequence.computed // size):
                block_tokens = sequence.tokens[index * size : (index + 1) * size]
                sequence.last_hash = chained_hash(sequence.last_hash, block_tokens)
                self.pool.register(sequence.blocks[index], sequence.last_hash)
            sequence.registered = sequence.computed // size

    def abort(self, sequence: Sequence) -> None:
        """Drop a request wherever it is (a client went away): its blocks go back to the pool."""
        if sequence.status is Status.WAITING:
            self.waiting.remove(sequence)
            sequence.status, sequence.finish_reason = Status.FINISHED, "abort"
        elif sequence.status is Status.RUNNING:
            self.finish(sequence, "abort")

    def finish(self, sequence: Sequence, reason: str) -> None:
        sequence.status, sequence.finish_reason = Status.FINISHED, reason
        self.running.remove(sequence)
        self.pool.release(sequence.blocks)
        sequence.blocks = []

"""Which cache blocks hold which tokens: a pool of fixed-size blocks with a free list, reference
counts, and prefix caching.

A block full of prompt tokens is known by a hash of its tokens chained with its predecessor's
hash, so two sequences whose prompts start alike share the blocks of that prefix (each holder
counts once), and a later sequence can find a block freed but not yet reused and skip computing
it. Blocks are handed out from the free list oldest-freed first, and a block leaves the prefix
index when it is handed out for other tokens.

Invariants (tested): every block is either free (count 0, in the free list once) or held (count
> 0, not in the free list); a sequence's table has one block per `block_size` tokens it holds.
"""

from __future__ import annotations

from collections import OrderedDict

NO_HASH = None


def chained_hash(parent: int, block: list[int]) -> int:
    """A full block's hash: its tokens chained with its predecessor's hash (0 for the first)."""
    return hash((parent, tuple(block)))


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chained hash of each full block of `tokens`."""
    hashes, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chained_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    """`blocks` cache blocks of `block_size` tokens."""

    def __init__(self, blocks: int, block_size: int):
        self.block_size = block_size
        self.counts = [0] * blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(blocks))  # oldest freed first
        self.by_hash: dict[int, int] = {}  # prefix hash -> block holding those tokens
        self.hash_of: dict[int, int] = {}  # block -> its prefix hash, while it holds those tokens

    @property
    def free_blocks(self) -> int:
        return len(self.free)

    @property
    def total_blocks(self) -> int:
        return len(self.counts)

    def cached_prefix(self, tokens: list[int]) -> list[int]:
        """The blocks already holding the longest run of `tokens`' full leading blocks. Never the
        whole prompt: its last token must be computed to give the next token's logits."""
        found = []
        for value in block_hashes(tokens[:-1], self.block_size):
            block = self.by_hash.get(value)
            if block is None:
                break
            found.append(block)
        return found

    def acquire(self, blocks: list[int]) -> None:
        """Hold `blocks` (found by `cached_prefix`) for one more sequence."""
        for block in blocks:
            if self.counts[block] == 0:
                del self.free[block]
            self.counts[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (their old prefix entries dropped); the caller checks `free_blocks`."""
        if count > len(self.free):
            raise RuntimeError(f"{count} blocks asked for, {len(self.free)} free")
        taken = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            old = self.hash_of.pop(block, NO_HASH)
            if old is not NO_HASH and self.by_hash.get(old) == block:
                del self.by_hash[old]
            self.counts[block] = 1
            taken.append(block)
        return taken

    def release(self, blocks: list[int]) -> None:
        """A sequence lets go of its blocks; a block nobody holds becomes free (its tokens stay
        findable by prefix until it is handed out again). Released last block first, so a
        sequence's tail is reused before its prefix."""
        for block in reversed(blocks):
            self.counts[block] -= 1
            if self.counts[block] == 0:
                self.free[block] = None

    def register(self, block: int, value: int) -> None:
        """`block` now holds the full prompt block whose chained hash is `value`."""
        if value not in self.by_hash:
            self.by_hash[value] = block
            self.hash_of[block] = value

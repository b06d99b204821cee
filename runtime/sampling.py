"""Sampling settings, and the batched sampler that turns a step's logits into next tokens.

Every sequence of a batch keeps its own settings and, when it has a seed, its own random stream:
the same request gives the same tokens whatever else is in the batch. Temperature, top-k and
top-p are applied to all rows at once on the device; each row's draw uses exponential noise from
its own generator (argmax of p / E, E ~ Exp(1), is a draw from p).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from qtool.errors import QtoolError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k -1 and top_p 1 keep every token. `stop`: strings that end
    the output (not included); `max_tokens`: new tokens at most; `seed`: a reproducible stream."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise QtoolError(f"temperature must be a number of at least 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise QtoolError(f"top_k must be a positive integer or -1 (all tokens), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise QtoolError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise QtoolError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token [S] for each row of `logits` [S, V] under its settings and generator."""
    if all(p.greedy for p in params):  # decided on the host: no float32 copy of the logits, no device sync
        return first_argmax(logits)
    logits = logits.float()
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    chosen = first_argmax(logits)
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
    logits = logits / temperature[:, None]
    logits = _keep_top_k(logits, [p.top_k for p in params])
    logits = _keep_top_p(logits, [p.top_p for p in params])
    probabilities = logits.softmax(dim=-1)
    noise = torch.stack([
        torch.empty(logits.shape[1], device="cpu").exponential_(generator=generator).to(logits.device)
        if generator is not None else torch.empty(logits.shape[1], device=logits.device).exponential_()
        for generator in generators
    ])
    drawn = (probabilities / noise).argmax(dim=-1)
    return torch.where(greedy, chosen, drawn)


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (the first index of a row's largest value, a NaN counting as largest),
    found in two passes over chunks of the row: torch reduces a whole row in one block of threads,
    35 us for one row of Llama-3's 128256 logits on an H200, where many blocks each take a chunk."""
    rows, width = logits.shape
    chunk = _chunk_width(width)
    if chunk == width:
        return logits.argmax(dim=-1)
    values, within = logits.reshape(rows, width // chunk, chunk).max(dim=-1)  # the first largest of each chunk
    best = values.argmax(dim=-1, keepdim=True)  # the first chunk holding the row's largest
    return (best * chunk + within.gather(1, best)).squeeze(1)


@functools.cache  # a step's vocabulary width: searched once, not at every step
def _chunk_width(width: int) -> int:
    """The smallest divisor of `width` of at least its square root: about as many chunks as they
    are wide (one chunk, `width` itself, for a prime width)."""
    return next(size for size in range(max(1, math.isqrt(width)), width + 1) if width % size == 0)


def _keep_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    if all(k == -1 for k in top_k):
        return logits
    k = torch.tensor([v if v != -1 else logits.shape[1] for v in top_k], device=logits.device).clamp(max=logits.shape[1])
    threshold = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < threshold, float("-inf"))


def _keep_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    if all(p >= 1 for p in top_p):
        return logits
    top_p = torch.tensor(top_p, device=logits.device)
    ordered, order = logits.sort(dim=-1, descending=True)
    before = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)  # mass of the tokens ranked above
    drop = before >= top_p[:, None]
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))

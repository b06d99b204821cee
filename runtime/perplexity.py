"""Perplexity with the GPTQ protocol, and agreement with a base model on the same windows.

Protocol: the text is tokenized once without special tokens, cut into non-overlapping windows of
`seqlen` tokens (the trailing partial window dropped, no BOS added per window), and perplexity is
exp of the mean next-token NLL over every predicted token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qtool.errors import QtoolError

PROTOCOL = "GPTQ: non-overlapping windows, no BOS, trailing partial window dropped, exp(mean token NLL)"


@dataclass
class Perplexity:
    ppl: float
    windows: int
    tokens: int
    seqlen: int
    seconds: float
    base_ppl: float | None = None
    kl: float | None = None
    top1_agree: float | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def split_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] of a token stream [T]; the partial tail is dropped."""
    count = tokens.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise QtoolError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    return tokens[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def _log_probs(model: nn.Module, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    logits = model(window.to(device).unsqueeze(0)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    base: nn.Module | None = None,
    on_window: Callable[[int], None] | None = None,
) -> Perplexity:
    """Perplexity of `model` on `windows`; with `base`, also the base model's perplexity, the mean
    KL(base || model) per token and the fraction of tokens where both rank the same token first."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    nll = base_nll = kl = agree = 0.0
    predicted = 0
    for index, window in enumerate(windows):
        targets = window[1:].to(device)
        log_probs = _log_probs(model, window, device)
        nll += F.nll_loss(log_probs, targets, reduction="sum").item()
        if base is not None:
            base_log_probs = _log_probs(base, window, device)
            base_nll += F.nll_loss(base_log_probs, targets, reduction="sum").item()
            kl += F.kl_div(log_probs, base_log_probs, log_target=True, reduction="sum").item()
            agree += (log_probs.argmax(-1) == base_log_probs.argmax(-1)).sum().item()
        predicted += targets.numel()
        if on_window is not None:
            on_window(index)
    result = Perplexity(
        ppl=_exp(nll / predicted),
        windows=windows.shape[0],
        tokens=windows.numel(),
        seqlen=windows.shape[1],
        seconds=time.perf_counter() - started,
    )
    if base is not None:
        result.base_ppl = _exp(base_nll / predicted)
        result.kl = kl / predicted
        result.top1_agree = agree / predicted
    return result


def _exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf

"""Spend a size budget across layers: one candidate scheme per layer, minimising the summed
sensitivity cost (`qtool.calibrate.sensitivity`) with the stored bytes at most the budget.

A multiple-choice knapsack. The Lagrangian relaxation (each layer alone minimises
cost + lambda * bytes; lambda bisected until the bytes fit) gives the best allocations on the
convex hull of each layer's (bytes, cost) points; a greedy pass then spends what is left on the
upgrades that buy the most cost per byte. Bytes are exact: each layer's size is what the format
writes for that scheme, so `qtool inspect` reports the same bits per weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from qtool.calibrate.sensitivity import DENSE, candidate_name, fits
from qtool.errors import QtoolError
from qtool.quantize.format import Format
from qtool.quantize.methods import round_to_nearest
from qtool.quantize.scheme import Override, Scheme

BISECTION_STEPS = 200


@dataclass(frozen=True)
class Option:
    """One way to store one layer: its scheme (None: dense), stored bytes and sensitivity cost."""

    scheme: Scheme | None
    bytes: int
    cost: float

    @property
    def name(self) -> str:
        return candidate_name(self.scheme)


@dataclass
class Allocation:
    """The chosen option of every layer, the budget it met and the weights it covers."""

    choices: dict[str, Option]
    budget_bytes: int
    layer_weights: dict[str, int]  # weights of each layer

    @property
    def weights(self) -> int:
        return sum(self.layer_weights.values())

    @property
    def bytes(self) -> int:
        return sum(option.bytes for option in self.choices.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights

    @property
    def cost(self) -> float:
        return sum(option.cost for option in self.choices.values())

    def overrides(self) -> tuple[Override, ...]:
        """One override per layer, matching its name exactly."""
        return tuple(Override(f"^{re.escape(name)}$", option.scheme) for name, option in self.choices.items())

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "bytes": self.bytes, "weights": self.weights,
                "bits_per_weight": self.bits_per_weight, "cost": self.cost,
                "layers": {name: option.name for name, option in self.choices.items()}}


def layer_options(shapes: dict[str, tuple[int, int]], costs: dict[str, dict[str, float]], candidates: list,
                  fmt: Format, scale_dtype: torch.dtype, dense_element_size: int,
                  fixed: dict[str, Scheme | None]) -> dict[str, list[Option]]:
    """Each layer's options: every candidate its shape allows (or only `fixed[name]`, a scheme the
    recipe itself gives the layer), with the bytes `fmt` stores it in."""
    sizes: dict[tuple, int] = {}

    def size(shape, scheme) -> int:
        key = (shape, scheme)
        if key not in sizes:
            sizes[key] = stored_bytes(shape, scheme, fmt, scale_dtype, dense_element_size)
        return sizes[key]

    options = {}
    for name, shape in shapes.items():
        schemes = [fixed[name]] if name in fixed else [s for s in candidates if fits(s, shape[1])]
        options[name] = [Option(s, size(shape, s), costs[name].get(candidate_name(s), 0.0)) for s in schemes]
    return options


def stored_bytes(shape: tuple[int, int], scheme: Scheme | None, fmt: Format, scale_dtype: torch.dtype,
                 dense_element_size: int) -> int:
    """Bytes of one layer's weight as `fmt` writes it (dense: the stored dtype's)."""
    if scheme is DENSE:
        return shape[0] * shape[1] * dense_element_size
    quantized = round_to_nearest(torch.zeros(shape), scheme, scale_dtype=scale_dtype).weight
    return sum(t.numel() * t.element_size() for t in fmt.layer_tensors("layer", quantized).values())


def allocate(options: dict[str, list[Option]], budget_bytes: int, layer_weights: dict[str, int]) -> Allocation:
    """The options minimising the summed cost with their bytes at most `budget_bytes`;
    `layer_weights`: how many weights each layer holds (for bits per weight)."""
    weights = sum(layer_weights.values())
    smallest = sum(min(o.bytes for o in name_options) for name_options in options.values())
    if smallest > budget_bytes:
        raise QtoolError(f"the budget ({8 * budget_bytes / weights:.3f} bits per weight) is below the smallest the "
                         f"candidate schemes allow ({8 * smallest / weights:.3f}); raise it or add smaller candidates")
    choices = _lagrangian(options, budget_bytes)
    _top_up(choices, options, budget_bytes)
    return Allocation(choices, budget_bytes, layer_weights)


def _pick(options: dict[str, list[Option]], price: float) -> dict[str, Option]:
    return {name: min(name_options, key=lambda o: (o.cost + price * o.bytes, o.bytes))
            for name, name_options in options.items()}


def _lagrangian(options: dict[str, list[Option]], budget_bytes: int) -> dict[str, Option]:
    """The cheapest-cost choice whose bytes fit, over prices per byte bisected in log space."""
    def total(choice):
        return sum(o.bytes for o in choice.values())

    free = _pick(options, 0.0)
    if total(free) <= budget_bytes:
        return free
    low, high = -60.0, 60.0  # log10 of the price of a byte
    best = _pick(options, 10.0**high)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        choice = _pick(options, 10.0**middle)
        if total(choice) <= budget_bytes:
            high, best = middle, choice
        else:
            low = middle
        if high - low < 1e-9:
            break
    return best


def _top_up(choices: dict[str, Option], options: dict[str, list[Option]], budget_bytes: int) -> None:
    """Spend what the budget has left on the upgrade with the largest cost saved per byte, while one fits."""
    left = budget_bytes - sum(o.bytes for o in choices.values())
    while True:
        best, best_gain = None, 0.0
        for name, name_options in options.items():
            current = choices[name]
            for option in name_options:
                extra, saved = option.bytes - current.bytes, current.cost - option.cost
                if saved <= 0 or extra > left:
                    continue
                gain = math.inf if extra <= 0 else saved / extra
                if gain > best_gain:
                    best, best_gain = (name, option), gain
        if best is None:
            return
        left -= best[1].bytes - choices[best[0]].bytes
        choices[best[0]] = best[1]

"""What one traced forward of a decoder block tells about it, and what a pass can keep for the next.

A block's forward is traced once, on one sample, with hooks on every submodule: the order in
which its linears run (grouped by the tensor they read) and, for each submodule, when it starts
and ends, how large its output is, and whether that output is just its last linear's output.
From that, `plan_memo` decides what a pass over all samples keeps so that the next pass, after
some linears change, need not recompute what those changes cannot affect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


def map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """`value` with `fn` applied to every tensor inside its tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def tensors_in(value) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(value, lambda tensor: found.append(tensor) or tensor)
    return found


def nbytes(value) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors_in(value))


@dataclass
class BlockTrace:
    """Positions are indices into the sequence of submodule starts and ends of one forward."""

    groups: list[list[str]] = field(default_factory=list)  # linears by shared input, in forward order
    entered: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)  # per sample
    input_bytes: dict[str, int] = field(default_factory=dict)  # per sample, linears only
    tails: dict[str, str] = field(default_factory=dict)  # submodule -> the linear whose output is its output
    templates: dict[str, object] = field(default_factory=dict)  # a tail submodule's output structure


def trace_block(block: nn.Module, run_one: Callable[[], None]) -> BlockTrace:
    """Trace the block's submodules while `run_one()` runs the block's forward once."""
    events: list[tuple[str, str, object]] = []
    modules = {name: module for name, module in block.named_modules() if name}
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: events.append(("enter", name, args[0] if args else None))))
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: events.append(("leave", name, out))))
    try:
        run_one()
    finally:
        for handle in handles:
            handle.remove()

    trace = BlockTrace()
    inputs: list[torch.Tensor] = []
    for position, (event, name, value) in enumerate(events):
        is_linear = isinstance(modules[name], nn.Linear)
        if event == "leave":
            trace.left[name] = position
            trace.output_bytes[name] = nbytes(value)
            before = events[position - 1]
            if (before[0] == "leave" and before[1].startswith(name + ".") and isinstance(modules[before[1]], nn.Linear)
                    and [id(t) for t in tensors_in(value)] == [id(before[2])]):
                trace.tails[name], trace.templates[name] = before[1], value
            continue
        trace.entered.setdefault(name, position)
        trace.calls[name] = trace.calls.get(name, 0) + 1
        if not is_linear or not isinstance(value, torch.Tensor):
            continue
        trace.input_bytes[name] = nbytes(value)
        match = next((i for i, tensor in enumerate(inputs) if tensor is value), None)
        if match is None:
            inputs.append(value)
            trace.groups.append([name])
        elif name not in trace.groups[match]:
            trace.groups[match].append(name)
    return trace


@dataclass(frozen=True)
class MemoPlan:
    """What a pass keeps for the next one: the outputs of `whole` submodules, and for each `tails`
    submodule the input of its last linear (the next pass recomputes only that linear)."""

    whole: tuple[str, ...] = ()
    tails: tuple[tuple[str, str], ...] = ()  # (submodule, its last linear)


def plan_memo(trace: BlockTrace, linears: list[str], then_changes: list[str], samples: int, budget: int) -> MemoPlan:
    """What to keep, within `budget` bytes over `samples` samples, when only the linears in
    `then_changes` change before the next pass.

    A submodule that holds linears and ends before any change starts computes the same output
    again: keep it whole. A submodule whose output is its last linear's output, where that linear
    is the only change before the submodule ends, computes that linear anew on the same input:
    keep the input. Submodules called more than once per forward are left alone."""
    if not then_changes or budget <= 0:
        return MemoPlan()
    first_change = min(trace.entered[name] for name in then_changes)
    once = {name for name, calls in trace.calls.items() if calls == 1}
    holds_linear = {name for name in trace.left if any(linear == name or linear.startswith(name + ".")
                                                       for linear in linears)}
    whole = {name for name in holds_linear & once if trace.left[name] < first_change}
    tails = {
        name: linear for name, linear in trace.tails.items()
        if name in once and linear in once
        and {change for change in then_changes if trace.entered[change] < trace.left[name]} == {linear}
    }
    chosen = whole | set(tails)
    outermost = [name for name in chosen if not any(name.startswith(other + ".") for other in chosen)]
    keep_whole, keep_tails, spent = [], [], 0
    for name in sorted(outermost, key=trace.entered.get):
        cost = samples * (trace.input_bytes[tails[name]] if name in tails else trace.output_bytes[name])
        if spent + cost > budget:
            continue
        spent += cost
        if name in tails:
            keep_tails.append((name, tails[name]))
        else:
            keep_whole.append(name)
    return MemoPlan(tuple(keep_whole), tuple(keep_tails))

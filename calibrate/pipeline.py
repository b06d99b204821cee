"""Sequential, block-by-block calibration of a decoder-only transformer.

The inputs of decoder block 0 are captured for every calibration sample; then, block by block,
the block is moved to the device, the caller's handler calibrates it (running the samples through
it with hooks on the linears it asks about, and changing its weights), and the block is run once
more to produce the next block's inputs, so later blocks see the errors of earlier ones. Only one
block and its activations live on the device at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from qtool.errors import QtoolError


class _StopForward(Exception):
    """Raised inside a forward to end it once what is needed has been seen."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList whose members all share one type."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise QtoolError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of identical blocks")
    return max(candidates, key=lambda item: len(item[1]))


@dataclass
class BlockInputs:
    """The hidden states entering a block, one tensor per batch, and the keyword arguments each
    batch's block call needs (attention mask, position ids, rotary embeddings...)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict] = field(default_factory=list)


def _map_tensors(value, fn):
    """`value` with `fn` applied to every tensor inside its tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _to(value, device):
    return _map_tensors(value, lambda tensor: tensor.to(device))


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor, batch_size: int,
                   device: torch.device, storage: torch.device) -> BlockInputs:
    """Run the model up to block 0 on every batch of `samples` [n, seqlen] and keep block 0's inputs."""
    captured = BlockInputs(hidden=[])

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach().to(storage))
        captured.kwargs.append({k: _to(v, storage) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")})
        raise _StopForward

    first = blocks[0]
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in samples.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    output = block(hidden.to(device), **_to(kwargs, device))
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockRun:
    """One block on the device with its inputs: what a handler uses to calibrate it."""

    def __init__(self, index: int, prefix: str, block: nn.Module, inputs: BlockInputs, device: torch.device):
        self.index, self.prefix, self.block, self.inputs, self.device = index, prefix, block, inputs, device
        self.linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        self._order: list[list[str]] | None = None

    def full_name(self, local: str) -> str:
        return f"{self.prefix}.{local}"

    def input_groups(self) -> list[list[str]]:
        """The block's linears grouped by the tensor they read, in the order the forward reaches
        them: for a Llama block [[q, k, v], [o], [gate, up], [down]]."""
        if self._order is None:
            seen: list[tuple[str, torch.Tensor]] = []
            handles = [
                module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0])))
                for name, module in self.linears.items()
            ]
            try:
                with torch.no_grad():
                    call_block(self.block, self.inputs.hidden[0][:1], _first_row(self.inputs.kwargs[0]), self.device)
            finally:
                for handle in handles:
                    handle.remove()
            groups: list[list[str]] = []
            tensors: list[torch.Tensor] = []
            for name, tensor in seen:
                match = next((i for i, t in enumerate(tensors) if t is tensor), None)
                if match is None:
                    tensors.append(tensor)
                    groups.append([name])
                elif name not in groups[match]:
                    groups[match].append(name)
            self._order = groups
        return self._order

    def collect(self, names: list[str], make_stat: Callable[[nn.Linear], object]) -> dict[str, object]:
        """Run every batch through the block with hooks feeding each named linear's inputs to its
        statistic (`stat.update(x)`); each forward stops as soon as the last of them has run."""
        stats = {name: make_stat(self.linears[name]) for name in names}
        order = [name for group in self.input_groups() for name in group]
        last = max(names, key=order.index)

        def hook(module, args, name):
            stats[name].update(args[0])
            if name == last:
                raise _StopForward

        handles = [self.linears[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
        try:
            with torch.no_grad():
                for hidden, kwargs in zip(self.inputs.hidden, self.inputs.kwargs):
                    try:
                        call_block(self.block, hidden, kwargs, self.device)
                    except _StopForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()
        return stats

    def outputs(self, storage: torch.device) -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                call_block(self.block, hidden, kwargs, self.device).to(storage)
                for hidden, kwargs in zip(self.inputs.hidden, self.inputs.kwargs)
            ]


def _first_row(kwargs: dict) -> dict:
    """Keyword arguments cut to the first sample of the batch (enough to trace the call order)."""
    return _map_tensors(kwargs, lambda tensor: tensor[:1] if tensor.dim() > 0 and tensor.shape[0] > 1 else tensor)


class BlockHandler(Protocol):
    def __call__(self, run: BlockRun) -> None: ...


def calibrate_sequentially(
    model: nn.Module,
    samples: torch.Tensor,
    handler: BlockHandler,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    offload_activations: bool = False,
    on_block: Callable[[int, int], None] | None = None,
) -> None:
    """Calibrate `model` block by block with `handler`, which may change each block's weights."""
    device = torch.device(device)
    storage = torch.device("cpu") if offload_activations else device
    prefix, blocks = decoder_blocks(model)
    _move_except(model, blocks, device)
    try:
        inputs = capture_inputs(model, blocks, samples, batch_size, device, storage)
    finally:
        _move_except(model, blocks, torch.device("cpu"))
    for index, block in enumerate(blocks):
        if on_block is not None:
            on_block(index, len(blocks))
        block.to(device)
        run = BlockRun(index, f"{prefix}.{index}", block, inputs, device)
        handler(run)
        inputs = BlockInputs(hidden=run.outputs(storage), kwargs=inputs.kwargs)
        block.to("cpu")


def _move_except(module: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every submodule of `module` that does not hold the blocks to `device` (embeddings, final
    norm, rotary tables, head); modules holding the blocks are walked into, the blocks stay put."""
    for child in module.children():
        if child is blocks:
            continue
        if any(inner is blocks for inner in child.modules()):
            _move_except(child, blocks, device)
        else:
            child.to(device)

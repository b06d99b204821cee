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

from qtool.calibrate.trace import BlockTrace, MemoPlan, map_tensors, nbytes, plan_memo, trace_block
from qtool.errors import QtoolError
from qtool.host_memory import release_freed_memory
from qtool.runtime.lazy import LazyWeights


MEMO_FACTOR = 4.0  # a pass's statistics plus what it keeps, in multiples of the block's input activations


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


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the decoder blocks, by full name (the head and embeddings left out)."""
    prefix, _ = decoder_blocks(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix + ".")}


def _to(value, device):
    return map_tensors(value, lambda tensor: tensor.to(device))


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


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device,
               matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The block's output hidden states; with `matmul_dtype`, matmuls run under autocast to it."""
    with torch.autocast(device.type, dtype=matmul_dtype or torch.float32, enabled=matmul_dtype is not None):
        output = block(hidden.to(device), **_to(kwargs, device))
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockRun:
    """One block on the device with its inputs: what a handler uses to calibrate it.

    Passes over the calibration samples repeat the block's forward many times (true-sequential
    runs one per group of linears, then one for the outputs). A pass told which linears change
    before the next one (`collect(..., then_changes=...)`) keeps, within `memo_bytes` less the
    size of the statistics it collects (the two coexist at the pass's peak), what the
    next pass would compute unchanged (see `qtool.calibrate.trace.plan_memo`); the next pass
    replays it instead of computing it.
    """

    def __init__(self, index: int, prefix: str, block: nn.Module, inputs: BlockInputs, device: torch.device,
                 storage: torch.device | None = None, matmul_dtype: torch.dtype | None = None, memo_bytes: int = 0):
        self.index, self.prefix, self.block, self.inputs, self.device = index, prefix, block, inputs, device
        self.storage = storage or device
        self.matmul_dtype = matmul_dtype
        self.memo_bytes = memo_bytes
        self.linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        self._trace: BlockTrace | None = None
        self._plan = MemoPlan()  # what the last pass kept, valid for the next one
        self._kept: dict[str, list] = {}  # submodule (whole) or linear (tail) -> one entry per batch

    def full_name(self, local: str) -> str:
        return f"{self.prefix}.{local}"

    def input_groups(self) -> list[list[str]]:
        """The block's linears grouped by the tensor they read, in the order the forward reaches
        them: for a Llama block [[q, k, v], [o], [gate, up], [down]]."""
        return self.trace().groups

    def trace(self) -> BlockTrace:
        """The block's forward traced once, on the first sample."""
        if self._trace is None:
            first = self.inputs.hidden[0][:1], first_sample(self.inputs.kwargs[0])
            with torch.no_grad():
                self._trace = trace_block(self.block, lambda: self._call(*first))
        return self._trace

    def collect(self, names: list[str], make_stat: Callable[[nn.Linear], object],
                then_changes: list[str] = ()) -> dict[str, object]:
        """Run every batch through the block with hooks feeding each named linear's inputs to its
        statistic (`stat.update(x)`); each forward stops as soon as the last of them has run.

        `then_changes`: the linears the caller changes (and the only parameters it changes)
        before the next pass, which lets this pass keep what the next one would recompute."""
        stats = {name: make_stat(self.linears[name]) for name in names}
        order = [name for group in self.input_groups() for name in group]
        last = max(names, key=order.index)

        def hook(module, args, name):
            stats[name].update(args[0])
            if name == last:
                raise _StopForward

        samples = sum(hidden.shape[0] for hidden in self.inputs.hidden)
        budget = self.memo_bytes - sum(nbytes(vars(stat)) for stat in stats.values())
        plan = plan_memo(self.trace(), list(self.linears), list(then_changes), samples, budget)
        handles = [self.linears[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
        try:
            self._pass(plan)
        finally:
            for handle in handles:
                handle.remove()
        return stats

    def outputs(self, storage: torch.device) -> list[torch.Tensor]:
        """The block's output for every batch (replaying what the last pass kept); ends the memo."""
        outputs: list[torch.Tensor] = []
        self._pass(MemoPlan(), lambda output: outputs.append(output.to(storage)))
        return outputs

    def _call(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return call_block(self.block, hidden, kwargs, self.device, self.matmul_dtype)

    def _pass(self, keep: MemoPlan, on_output: Callable[[torch.Tensor], None] | None = None) -> None:
        """One forward over every batch, replaying what the last pass kept and keeping `keep`."""
        modules = dict(self.block.named_modules())
        replayed, batch = self._plan, 0
        kept = {name: self._kept[name] for name in keep.whole if name in replayed.whole}
        recorders = [(name, modules[name].register_forward_hook) for name in keep.whole if name not in kept]
        recorders += [(linear, self.linears[linear].register_forward_pre_hook) for _, linear in keep.tails]
        handles = []
        for name, register in recorders:
            kept[name] = []
            handles.append(register(lambda m, args, *out, name=name: kept[name].append(
                map_tensors(out[0] if out else args[0], self._stored)), prepend=True))  # before a stop

        def whole(name):
            return lambda *args, **kwargs: _to(self._kept[name][batch], self.device)

        def tail(name, linear):
            template = self.trace().templates[name]
            return lambda *args, **kwargs: map_tensors(
                template, lambda _: self.linears[linear](_to(self._kept[linear][batch], self.device)))

        for name in replayed.whole:
            modules[name].forward = whole(name)
        for name, linear in replayed.tails:
            modules[name].forward = tail(name, linear)
        try:
            with torch.no_grad():
                for batch, (hidden, kwargs) in enumerate(zip(self.inputs.hidden, self.inputs.kwargs)):
                    try:
                        output = self._call(hidden, kwargs)
                    except _StopForward:
                        continue
                    if on_output is not None:
                        on_output(output)
        finally:
            for name in [*replayed.whole, *(name for name, _ in replayed.tails)]:
                del modules[name].forward
            for handle in handles:
                handle.remove()
        self._plan, self._kept = keep, kept
        release_freed_memory()

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.storage)


def first_sample(kwargs: dict) -> dict:
    """Keyword arguments cut to the first sample of the batch (enough to trace the call order)."""
    return map_tensors(kwargs, lambda tensor: tensor[:1] if tensor.dim() > 0 and tensor.shape[0] > 1 else tensor)


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
    matmul_dtype: torch.dtype | None = None,
    memo_factor: float = MEMO_FACTOR,
    weights: LazyWeights | None = None,
    on_block_done: Callable[[BlockRun], None] | None = None,
) -> None:
    """Calibrate `model` block by block with `handler`, which may change each block's weights.

    Blocks run under autocast to `matmul_dtype` when it is given. Each block's passes may keep
    submodule outputs worth up to `memo_factor` times the size of the block's inputs. With lazy
    `weights`, what runs before the first block is loaded as it runs and released after (of the
    input embeddings, only the rows of the calibration tokens), and each block is loaded when its
    turn comes; `on_block_done(run)` follows each block's last pass."""
    device = torch.device(device)
    storage = torch.device("cpu") if offload_activations else device
    prefix, blocks = decoder_blocks(model)
    outside = outside_blocks(model, blocks)
    if weights is not None and model.get_input_embeddings() is not None:
        weights.load_rows(model.get_input_embeddings(), samples)
    for module in outside:
        move_loaded(module, device)
    loaders = [hook for module in outside for hook in weights.load_on_demand(module, device)] if weights else []
    try:
        inputs = capture_inputs(model, blocks, samples, batch_size, device, storage)
    finally:
        for hook in loaders:
            hook.remove()
        for module in outside:
            if weights is not None:
                weights.release(module)
            move_loaded(module, torch.device("cpu"))
    for index, block in enumerate(blocks):
        if on_block is not None:
            on_block(index, len(blocks))
        if weights is not None:
            weights.load(block)
        block.to(device)
        memo_bytes = int(memo_factor * sum(nbytes(hidden) for hidden in inputs.hidden))
        run = BlockRun(index, f"{prefix}.{index}", block, inputs, device, storage, matmul_dtype, memo_bytes)
        handler(run)
        inputs = BlockInputs(hidden=run.outputs(storage), kwargs=inputs.kwargs)
        block.to("cpu")
        if on_block_done is not None:
            on_block_done(run)


def outside_blocks(module: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The submodules of `module` that do not hold the blocks (embeddings, final norm, rotary
    tables, head): modules holding the blocks are walked into, the blocks left out."""
    found = []
    for child in module.children():
        if child is blocks:
            continue
        if any(inner is blocks for inner in child.modules()):
            found += outside_blocks(child, blocks)
        else:
            found.append(child)
    return found


def move_loaded(module: nn.Module, device: torch.device) -> None:
    """`module.to(device)` for the tensors it holds; empty (meta) parameters stay as they are."""
    for owner in module.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            owner._buffers[name] = buffer.to(device)
        for param in owner.parameters(recurse=False):
            if not param.is_meta:
                param.data = param.data.to(device)

"""The diagonal Fisher information of a model's linear weights: how much the language-model loss
cares about each weight, the sensitivity SqueezeLLM weights its k-means with.

F[w] = mean over calibration sequences s of (d loss_s / d w)^2, loss_s being the mean next-token
negative log-likelihood of sequence s. Per-sequence gradients of a linear layer are G_s^T X_s
(the gradient at its output times its input), squared and summed into a float32 buffer.

Memory stays near one decoder block: a batch runs forward block by block keeping only each
block's input (gradient checkpointing over blocks); the loss is taken through the model's own
head; then, from the last block back, each block is run again with gradients enabled and its
input's gradient becomes the previous block's output gradient. Parameters never get gradients of
their own: only the target linears' inputs and output gradients are seen, through hooks. With
lazy weights each block is read from disk when its turn comes and released after, and the
buffers (4 bytes per target weight) live in host memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qtool.calibrate.pipeline import capture_inputs, decoder_blocks, move_loaded, outside_blocks
from qtool.errors import QtoolError
from qtool.runtime.lazy import LazyWeights


def diagonal_fisher(
    model: nn.Module,
    samples: torch.Tensor,
    targets: list[str],
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    matmul_dtype: torch.dtype | None = None,
    weights: LazyWeights | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher [out, in] (float32, on the CPU) of each named linear inside the decoder
    blocks, over the token windows `samples` [n, seqlen], `batch_size` windows at a time, matmuls
    under autocast to `matmul_dtype` when given. `on_progress(done, total)` after each batch."""
    device = torch.device(device)
    prefix, blocks = decoder_blocks(model)
    by_block: list[dict[str, str]] = [{} for _ in blocks]
    for name in targets:
        index, _, local = name.removeprefix(prefix + ".").partition(".")
        by_block[int(index)][local] = name
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in targets}
    fisher = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}
    outside = outside_blocks(model, blocks)
    for module in outside:
        if weights is not None:
            weights.load(module)
        module.requires_grad_(False)
        move_loaded(module, device)
    pass_ = _FisherPass(model, blocks, device, matmul_dtype, weights)
    try:
        for done, batch in enumerate(samples.split(batch_size), start=1):
            pass_.accumulate(batch.to(device), [{local: fisher[name] for local, name in block.items()} for block in by_block])
            if on_progress is not None:
                on_progress(min(done * batch_size, len(samples)), len(samples))
    finally:
        for module in outside:
            move_loaded(module, torch.device("cpu"))
            if weights is not None:
                weights.release(module)
    for buffer in fisher.values():
        buffer.div_(len(samples))
    return fisher


class _FisherPass:
    """Forward and backward of one batch, block by block."""

    def __init__(self, model, blocks: nn.ModuleList, device: torch.device, matmul_dtype, weights: LazyWeights | None):
        self.model, self.blocks, self.device, self.weights = model, blocks, device, weights
        self.autocast = dict(device_type=device.type, dtype=matmul_dtype or torch.float32, enabled=matmul_dtype is not None)
        self.matmul_dtype = matmul_dtype or torch.float32

    def accumulate(self, batch: torch.Tensor, buffers: list[dict[str, torch.Tensor]]) -> None:
        """Add the squared per-sequence gradients of `batch` into each block's `buffers` (local name -> buffer)."""
        captured = capture_inputs(self.model, self.blocks, batch, len(batch), self.device, self.device)
        hidden, kwargs = captured.hidden[0], captured.kwargs[0]
        block_inputs, returns_tuple = [], False
        with torch.no_grad():
            for block in self.blocks:
                with self._loaded(block):
                    block_inputs.append(hidden)
                    output = self._call(block, hidden, kwargs)
                    returns_tuple = isinstance(output, (tuple, list))
                    hidden = output[0] if returns_tuple else output
        grad = self._head_gradient(batch, hidden, returns_tuple)
        for index in reversed(range(len(self.blocks))):
            with self._loaded(self.blocks[index]):
                grad = self._block_backward(self.blocks[index], block_inputs.pop(), kwargs, grad, buffers[index])

    def _call(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict):
        with torch.autocast(**self.autocast):
            return block(hidden, **kwargs)

    @contextmanager
    def _loaded(self, block: nn.Module):
        if self.weights is not None:
            self.weights.load(block)
        block.requires_grad_(False).to(self.device)
        try:
            yield
        finally:
            block.to("cpu")
            if self.weights is not None:
                self.weights.release(block)

    def _head_gradient(self, batch: torch.Tensor, final: torch.Tensor, returns_tuple: bool) -> torch.Tensor:
        """d(sum of per-sequence losses) / d(last block's output), through the model's own head:
        the model runs with its blocks replaced, the first by the final hidden states, the rest by
        the identity."""
        final = final.detach().requires_grad_()

        def wrap(hidden):
            return (hidden,) if returns_tuple else hidden

        for index, block in enumerate(self.blocks):
            block.forward = (lambda *args, **kwargs: wrap(final)) if index == 0 else (
                lambda hidden, *args, **kwargs: wrap(hidden))
        try:
            with torch.enable_grad(), torch.autocast(**self.autocast):
                logits = self.model(input_ids=batch, use_cache=False).logits
            per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            (per_token / (batch.shape[1] - 1)).backward()
        finally:
            for block in self.blocks:
                del block.forward
        return final.grad

    def _block_backward(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict, grad: torch.Tensor,
                        buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run `block` again with gradients, push `grad` back through it, and add each target
        linear's squared per-sequence weight gradients to its buffer. Returns the input's gradient."""
        on_device = {local: buffer if buffer.device == self.device else torch.zeros_like(buffer, device=self.device)
                     for local, buffer in buffers.items()}

        def watch(module, args, output, local):
            inputs = args[0].detach()
            output.register_hook(lambda out_grad: self._add_squares(on_device[local], out_grad, inputs))

        handles = [block.get_submodule(local).register_forward_hook(lambda m, a, o, local=local: watch(m, a, o, local))
                   for local in buffers]
        hidden = hidden.detach().requires_grad_()
        try:
            with torch.enable_grad():
                output = self._call(block, hidden, kwargs)
                (output[0] if isinstance(output, (tuple, list)) else output).backward(grad)
        finally:
            for handle in handles:
                handle.remove()
        for local, buffer in buffers.items():
            if on_device[local] is not buffer:
                buffer.add_(on_device[local].cpu())
        return hidden.grad

    def _add_squares(self, buffer: torch.Tensor, out_grad: torch.Tensor, inputs: torch.Tensor) -> None:
        for grad_s, input_s in zip(out_grad, inputs):  # one sequence at a time: [tokens, out], [tokens, in]
            sample = (grad_s.to(self.matmul_dtype).t() @ input_s.to(self.matmul_dtype)).float()
            buffer.addcmul_(sample, sample)


FISHER_KEY = "qtool-fisher-key"


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], key: str) -> None:
    """Save Fisher information under `key` (what it was computed from), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    save_file({name: tensor.contiguous() for name, tensor in fisher.items()}, scratch, metadata={FISHER_KEY: key})
    scratch.replace(path)


class StoredFisher(Mapping):
    """Fisher information saved by `save_fisher`, read from disk one layer at a time."""

    def __init__(self, path: Path, key: str):
        self.path = path
        try:
            with safe_open(path, framework="pt") as reader:
                stored_key = (reader.metadata() or {}).get(FISHER_KEY)
                self.names = list(reader.keys())
        except (SafetensorError, OSError) as error:
            raise QtoolError(f"{path} is not a readable Fisher information file ({error}); remove it") from None
        if stored_key != key:
            raise QtoolError(f"{path} holds the Fisher information of another model, calibration set or precision; "
                             f"remove it or pass another --fisher path")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise QtoolError(f"{self.path} has no Fisher information for {name}; remove it to recompute")
        with safe_open(self.path, framework="pt") as reader:
            return reader.get_tensor(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

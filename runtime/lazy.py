"""Models whose weights stay on disk until a part of the model needs them.

The model is built from its config with empty (meta) parameters; `LazyWeights.load(module)`
reads a module's parameters from the safetensors files (one tensor at a time) and
`LazyWeights.release(module)` returns them to meta. Calibration loads one decoder block at a
time, so host memory holds one block, not the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.quantize.format.checkpoint import PendingTensor, TensorSource


class LazyWeights:
    """The on-disk weights of a model skeleton, loaded and released module by module, in `dtype`
    (linear layers' weights in `linear_dtype`). `missing` lists parameters the files do not hold
    under the model's names (legacy key layouts)."""

    def __init__(self, model: nn.Module, folder: Path, dtype: torch.dtype, linear_dtype: torch.dtype | None = None):
        self.model, self.dtype = model, dtype
        self.linear_dtype = linear_dtype or dtype
        self.linear_weights = {_join(name, "weight") for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.source = TensorSource(folder)
        self.names = {id(module): name for name, module in model.named_modules()}
        canonical: dict[int, str] = {}
        self.aliases: dict[str, str] = {}  # tied parameter -> the name it is stored under
        for name, param in model.named_parameters(remove_duplicate=False):
            first = canonical.setdefault(id(param), name)
            if first != name:
                self.aliases[name] = first
        self.missing = [name for name in canonical.values() if name not in self.source]

    def load(self, module: nn.Module) -> None:
        """Give every empty parameter of `module` its stored value (in the model's dtype, linear
        layers' weights in theirs)."""
        prefix = self.names[id(module)]
        values = {
            local: self.read(name, self.linear_dtype if name in self.linear_weights else None)
            for local, param in module.named_parameters(remove_duplicate=False) if param.is_meta
            for name in [_join(prefix, local)]
        }
        if values:
            module.load_state_dict(values, strict=False, assign=True)

    def load_rows(self, embedding: nn.Module, rows: torch.Tensor, chunk: int = 8192) -> None:
        """Give an empty embedding table only the stored rows `rows` (token ids), read `chunk` rows
        at a time. The table is allocated whole, but the pages of rows never written are never
        touched, so they take no memory: capturing calibration inputs looks up these rows alone,
        and an 8B model's table would take 2 GB in float32."""
        name = _join(self.names[id(embedding)], "weight")
        weight = embedding.weight
        if not weight.is_meta:
            return
        table = torch.empty(weight.shape, dtype=self.dtype)
        rows = rows.unique()
        for start in range(0, weight.shape[0], chunk):
            wanted = rows[(rows >= start) & (rows < start + chunk)]
            if len(wanted):
                stored = self.source.read_rows(self.aliases.get(name, name), start, start + chunk)
                table[wanted] = stored[wanted - start].to(self.dtype)
        embedding.weight = nn.Parameter(table, requires_grad=False)

    def release(self, module: nn.Module) -> None:
        """Empty `module`'s parameters again (they can be loaded back from disk)."""
        for owner in module.modules():
            for local, param in list(owner.named_parameters(recurse=False)):
                if not param.is_meta:
                    setattr(owner, local, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored tensor `name`, floating point converted (once) to `dtype` or the model's."""
        tensor = self.source.read(self.aliases.get(name, name))
        return tensor.to(dtype or self.dtype) if tensor.is_floating_point() else tensor

    def pending(self, name: str, like: torch.Tensor, dtype: torch.dtype | None) -> PendingTensor:
        """`name` as a tensor the writer reads from disk when it gets to it, in `dtype`."""
        dtype = dtype if dtype is not None and like.is_floating_point() else like.dtype
        return PendingTensor(dtype, tuple(like.shape), lambda: self.read(name, dtype))

    def load_on_demand(self, module: nn.Module, device: torch.device) -> list:
        """Hooks that load each empty leaf of `module` onto `device` when it first runs; remove
        them when done."""
        def load(leaf: nn.Module, args) -> None:
            self.load(leaf)
            leaf.to(device)

        return [
            leaf.register_forward_pre_hook(load)
            for leaf in module.modules()
            if not list(leaf.children()) and any(p.is_meta for p in leaf.parameters(recurse=False))
        ]


def _join(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def read_config(folder: Path, trust_remote_code: bool = False):
    """`folder`'s transformers config, without its quantization_config (qtool swaps in its own layers)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise QtoolError(f"cannot read the model config in {folder}: {error}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool, native: bool = False) -> nn.Module:
    """The model of `folder`'s config with empty parameters (buffers are real): transformers' own
    modeling code, or with `native` qtool's runtime model code (`qtool.runtime.models`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = read_config(folder, trust_remote_code)
    with init_empty_weights(include_buffers=False):
        if native:
            from qtool.runtime.models.llama import LlamaForCausalLM

            model = LlamaForCausalLM(config)  # parameters take the dtype of the tensors assigned to them
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()

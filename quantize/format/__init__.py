"""Checkpoint formats: a registry of writers/readers around the canonical `QuantizedWeight`.

Each format knows how to store one quantized layer, what `quantization_config` says about the whole
model, and how to read both back. Folder handling (atomic writes, shards) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from qtool.calibrate.kv_scales import KV_CACHE_SCHEME
from qtool.errors import FAILURE, QtoolError
from qtool.quantize.format import awq, compressed_tensors, gptq, native
from qtool.quantize.format.checkpoint import (
    PendingTensor,
    load_tensors,
    model_config,
    save_tensors,
    unique_tensors,
    write_folder_atomically,
    write_json,
)
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme
from qtool.registry import Registry

if TYPE_CHECKING:  # the lazy loader reads files through this package
    from qtool.runtime.lazy import LazyWeights

RECORD_FILE = "qtool.json"


@dataclass(frozen=True)
class Format:
    name: str
    quant_method: str
    layer_tensors: Callable[[str, QuantizedWeight], dict[str, torch.Tensor]]
    quantization_config: Callable[[dict[str, QuantizedWeight], list[str]], dict]
    read_layers: Callable[[dict[str, torch.Tensor], dict], tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]]
    layer_schemes: Callable[[dict, list[str]], dict[str, Scheme]]
    layer_suffixes: tuple[str, ...]
    layer_shapes: Callable[[Path, list[str], dict], dict[str, tuple[int, int]]]  # from headers (+ small tensors)
    dense_linears: Callable[[dict], list[str]]  # the linears quantization_config leaves dense
    act_order: Callable[[dict, str, object], bool]  # act_order(config, layer, tensor names): groups follow a g_idx
    check: Callable[[object], None] | None = None  # check(recipe): refuse what the format cannot hold, up front
    misfit: Callable[[str, QuantizedWeight], str | None] | None = None  # why a layer cannot be stored unchanged
    scale_dtype: torch.dtype | None = None  # the dtype the format stores scales in (None: the model's)
    kv_scales: bool = False  # whether it stores a float8 KV cache's scales (compressed-tensors' kv_cache_scheme)

    def tensors(self, name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The tensors stored for one layer; one the format cannot hold unchanged is a failure
        (placeholders, whose values are not in memory, are checked when they are read back)."""
        reason = None if self.misfit is None or weight.packed.is_meta else self.misfit(name, weight)
        if reason is not None:
            raise QtoolError(reason, FAILURE)
        return self.layer_tensors(name, weight)

    def layer_names(self, tensor_names) -> list[str]:
        """Quantized layers, named by the tensor every one of them stores first in `layer_suffixes`."""
        marker = "." + self.layer_suffixes[0]
        return sorted(name.removesuffix(marker) for name in tensor_names if name.endswith(marker))


FORMATS: Registry[Format] = Registry("checkpoint format")


def _format_of(name: str, module) -> Format:
    """The format a module implements: its QUANT_METHOD, LAYER_SUFFIXES and functions."""
    return Format(
        name=name,
        quant_method=module.QUANT_METHOD,
        layer_tensors=module.layer_tensors,
        quantization_config=module.quantization_config,
        read_layers=module.read_layers,
        layer_schemes=module.layer_schemes,
        layer_suffixes=module.LAYER_SUFFIXES,
        layer_shapes=module.layer_shapes,
        dense_linears=module.dense_linears,
        act_order=module.act_order,
        check=getattr(module, "check", None),
        misfit=getattr(module, "misfit", None),
        scale_dtype=getattr(module, "SCALE_DTYPE", None),
        kv_scales=getattr(module, "KV_SCALES", False),
    )


for _name, _module in (("compressed-tensors", compressed_tensors), ("awq", awq), ("gptq", gptq), ("qtool", native)):
    FORMATS.register(_name)(_format_of(_name, _module))


@dataclass
class QuantizedCheckpoint:
    """A quantized checkpoint in memory: its config.json, quantized layers and dense tensors."""

    config: dict
    weights: dict[str, QuantizedWeight]
    dense: dict[str, torch.Tensor]


def write_checkpoint(
    destination: Path,
    model: nn.Module,
    weights: dict[str, QuantizedWeight],
    dense_linears: list[str],
    format_name: str,
    record: dict,
    tokenizer=None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    lazy: LazyWeights | None = None,
    read_weight: Callable[[str], QuantizedWeight] | None = None,
    kv_scales: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `model` with `weights` replacing its quantized linears' weights, atomically. Dense
    floating-point tensors are stored in `dtype` (default: as they are in the model); those a
    lazily loaded model holds empty are read from disk one at a time as they are written, and so
    are quantized layers held as placeholders (meta tensors), through `read_weight(name)`.
    `kv_scales`: a float8 KV cache's scale tensors (`qtool.calibrate.kv_scales`), stored as they
    are, with the `kv_cache_scheme` that announces them."""
    fmt = FORMATS.get(format_name)
    placeholders = _PlaceholderReader(fmt, read_weight)

    def fill(folder: Path) -> None:
        tensors = {
            name: _dense_entry(name, tensor, dtype, lazy)
            for name, tensor in _distinct_tensors(model, lazy).items()
            if not (name.endswith(".weight") and name.removesuffix(".weight") in weights)
        }
        for name, weight in weights.items():
            tensors.update(placeholders.entries(name, weight))
        save_tensors(folder, {**tensors, **(kv_scales or {})})
        config = model.config.to_dict()
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = fmt.quantization_config(weights, dense_linears)
        if kv_scales:
            config["quantization_config"]["kv_cache_scheme"] = dict(KV_CACHE_SCHEME)
        write_json(folder / "config.json", config)
        if getattr(model, "generation_config", None) is not None:
            write_json(folder / "generation_config.json", model.generation_config.to_diff_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_json(folder / RECORD_FILE, record)

    write_folder_atomically(destination, fill, overwrite=overwrite)


class _PlaceholderReader:
    """Pending tensors for quantized layers held as placeholders: the writer reads each layer back
    when it reaches its first tensor (a layer's tensors are written one after the other), and keeps
    only that layer in memory."""

    def __init__(self, fmt: Format, read_weight: Callable[[str], QuantizedWeight] | None):
        self.fmt, self.read_weight = fmt, read_weight
        self.layer: str | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def entries(self, name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor | PendingTensor]:
        tensors = self.fmt.tensors(name, weight)
        if not weight.packed.is_meta:
            return tensors
        if self.read_weight is None:
            raise QtoolError(f"{name} is a placeholder and nothing was given to read it back", FAILURE)
        return {key: PendingTensor(tensor.dtype, tuple(tensor.shape), lambda key=key: self.read(name, key))
                if tensor.is_meta else tensor for key, tensor in tensors.items()}

    def read(self, name: str, key: str) -> torch.Tensor:
        if self.layer != name:
            self.layer, self.tensors = None, {}  # drop the last layer before reading the next
            self.tensors, self.layer = self.fmt.tensors(name, self.read_weight(name)), name
        return self.tensors[key]


def _distinct_tensors(model: nn.Module, lazy: LazyWeights | None) -> dict[str, torch.Tensor]:
    """The state dict without tied copies (a tied lm_head keeps only the embedding)."""
    state = model.state_dict()
    if lazy is None:
        return unique_tensors(state)
    return {name: tensor for name, tensor in state.items() if name not in lazy.aliases}


def _dense_entry(name: str, tensor: torch.Tensor, dtype: torch.dtype | None, lazy: LazyWeights | None):
    if tensor.is_meta:
        return lazy.pending(name, tensor, dtype)
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def format_for(config: dict) -> Format:
    """The format a checkpoint's config.json declares."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    for name in FORMATS:
        if FORMATS.get(name).quant_method == method:
            return FORMATS.get(name)
    readable = ", ".join(FORMATS.get(name).quant_method for name in FORMATS)
    raise QtoolError(f"quantization method {method!r} in config.json is not supported; qtool reads: {readable}")


def read_checkpoint(folder: Path) -> QuantizedCheckpoint:
    config = model_config(folder)
    fmt = format_for(config)
    weights, dense = fmt.read_layers(load_tensors(folder), config["quantization_config"])
    return QuantizedCheckpoint(config=config, weights=weights, dense=dense)

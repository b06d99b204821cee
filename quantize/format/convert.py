"""Rewrite a quantized checkpoint in another format, only where that keeps every weight as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.quantize.format import FORMATS, RECORD_FILE, QuantizedCheckpoint, read_checkpoint
from qtool.quantize.format.checkpoint import (
    AUTOGPTQ_CONFIG, INDEX_FILE, model_config, read_json, save_tensors, write_folder_atomically, write_json,
)
from qtool.quantize.qweight import QuantizedWeight


def convert_checkpoint(source: Path, destination: Path, format_name: str, linear_layers: list[str],
                       overwrite: bool = False) -> QuantizedCheckpoint:
    """Write the checkpoint in `source` to `destination` in `format_name`; `linear_layers` names
    every linear layer of the model (those it does not quantize are listed as dense). Everything
    that could refuse the conversion is checked before anything is written; returns the checkpoint
    as converted."""
    fmt = FORMATS.get(format_name)
    if destination.expanduser().absolute() == source.expanduser().absolute():
        raise QtoolError(f"convert writes a new folder; choose an -o other than {source}")
    if "quantization_config" not in model_config(source):
        raise QtoolError(f"{source} is not a quantized checkpoint (its config.json has no quantization_config); "
                         f"make one with qtool quantize")
    checkpoint = read_checkpoint(source)
    scale_dtype = fmt.scale_dtype or _model_dtype(checkpoint)
    weights = {}
    for name, weight in checkpoint.weights.items():
        reason = _scales_misfit(name, weight, scale_dtype)
        if reason is None:
            weights[name] = _with_scales(weight, scale_dtype)
            reason = fmt.misfit(name, weights[name]) if fmt.misfit is not None else None
        if reason is not None:
            raise QtoolError(f"cannot convert to {format_name} without changing the weights: {reason}")
    dense_linears = sorted(set(linear_layers) - set(weights))
    try:
        quantization_config = fmt.quantization_config(weights, dense_linears)
    except QtoolError as error:
        raise QtoolError(f"cannot convert to {format_name}: {error}") from None
    config = {**checkpoint.config, "quantization_config": quantization_config}

    def fill(folder: Path) -> None:
        tensors = dict(checkpoint.dense)
        for name, weight in weights.items():
            tensors.update(fmt.tensors(name, weight))
        save_tensors(folder, tensors)
        write_json(folder / "config.json", config)
        for file in sorted(source.iterdir()):
            skipped = ("config.json", INDEX_FILE, AUTOGPTQ_CONFIG)  # written anew, or now in config.json
            if file.is_file() and file.suffix != ".safetensors" and file.name not in skipped:
                shutil.copyfile(file, folder / file.name)
        if (source / RECORD_FILE).is_file():
            record = read_json(source / RECORD_FILE)
            write_json(folder / RECORD_FILE, {**record, "converted": {"from": str(source), "format": format_name}})

    write_folder_atomically(destination, fill, overwrite=overwrite)
    return QuantizedCheckpoint(config, weights, checkpoint.dense)


def _model_dtype(checkpoint: QuantizedCheckpoint) -> torch.dtype:
    """The dtype of the checkpoint's dense floating-point tensors (float16 if it has none)."""
    for tensor in checkpoint.dense.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float16


def _scales_misfit(name: str, weight: QuantizedWeight, dtype: torch.dtype) -> str | None:
    """Why `weight`'s scales cannot be stored in `dtype` unchanged, or None."""
    if weight.scales is None or torch.equal(weight.scales.to(dtype).to(weight.scales.dtype), weight.scales):
        return None
    return (f"{name}: its {str(weight.scales.dtype).removeprefix('torch.')} scales do not fit "
            f"{str(dtype).removeprefix('torch.')}, which the target format stores them in")


def _with_scales(weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    if weight.scales is None or weight.scales.dtype == dtype:
        return weight
    return QuantizedWeight(weight.packed, weight.scales.to(dtype), weight.zeros, weight.scheme, weight.shape,
                           weight.g_idx, weight.lut, weight.outliers)

"""`qtool convert`: a quantized checkpoint rewritten in another format, where that is lossless."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.cli import console
from qtool.errors import QtoolError
from qtool.quantize.apply import linear_layers
from qtool.quantize.format import format_for
from qtool.quantize.format.checkpoint import model_config
from qtool.quantize.format.convert import convert_checkpoint
from qtool.runtime.lazy import build_skeleton


def run_convert(checkpoint: Path, output: Path, format_name: str, overwrite: bool, trust_remote_code: bool,
                json_output: bool, quiet: bool) -> None:
    if not (checkpoint / "config.json").is_file():
        raise QtoolError(f"{checkpoint} is not a checkpoint folder: it has no config.json")
    config = model_config(checkpoint)
    source_format = format_for(config).name if "quantization_config" in config else None
    console.quiet_libraries()
    with console.working("converting", f"{checkpoint} -> {output}", not (quiet or json_output)):
        linears = list(linear_layers(build_skeleton(checkpoint, torch.float16, trust_remote_code)))
        converted = convert_checkpoint(checkpoint, output, format_name, linears, overwrite)
    summary = {"checkpoint": str(checkpoint), "output": str(output), "from": source_format, "to": format_name,
               "quantized_layers": len(converted.weights)}
    if json_output:
        console.print_json(summary)
        return
    console.stdout.print(f"{checkpoint} ({source_format}) -> {output} ({format_name}): "
                         f"{len(converted.weights)} quantized layers, weights unchanged")

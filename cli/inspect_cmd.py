"""`qtool inspect`: what a checkpoint holds, layer by layer."""

from __future__ import annotations

from pathlib import Path

from qtool.cli import console
from qtool.errors import QtoolError
from qtool.runtime.summary import summarize


def run_inspect(checkpoint: Path, json_output: bool) -> None:
    if not (checkpoint / "config.json").is_file():
        raise QtoolError(f"{checkpoint} is not a checkpoint folder: it has no config.json")
    summary = summarize(checkpoint)
    if json_output:
        console.print_json({"checkpoint": str(checkpoint), **summary.to_dict()})
        return
    from rich.table import Table

    table = Table(title=f"qtool inspect {checkpoint}")
    for column, justify in (("layer", "left"), ("shape", "right"), ("scheme", "left"), ("bits/weight", "right"), ("size", "right")):
        table.add_column(column, justify=justify)
    for layer in summary.layers:
        table.add_row(
            layer.name, "x".join(map(str, layer.shape)), layer.scheme, f"{layer.bits_per_weight:.3f}", console.mib(layer.bytes)
        )
    console.stdout.print(table)
    quantized_bytes = sum(layer.bytes for layer in summary.layers)
    bits = summary.quantized_bits_per_weight
    console.stdout.print(
        f"{len(summary.layers)} quantized layers ({console.mib(quantized_bytes)}"
        + (f", {bits:.3f} bits/weight; {summary.block_bits_per_weight:.3f} over the blocks' linears with the dense ones"
           if bits is not None else "")
        + f"); dense linears: {', '.join(summary.dense_linears) or 'none'}; total {console.mib(summary.total_bytes)}"
    )

"""`qtool quantize`: resolve recipe and model, quantize, write the checkpoint, print a summary."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

import torch

from qtool import __version__
from qtool.cli import console
from qtool.errors import QtoolError
from qtool.quantize.apply import quantize_model
from qtool.quantize.format import FORMATS, write_checkpoint
from qtool.quantize.methods import METHODS
from qtool.quantize.scheme import Override, Recipe, Scheme
from qtool.runtime.loader import load_model, load_tokenizer
from qtool.runtime.resolve import resolve_model
from qtool.runtime.summary import summarize


def build_recipe(method: str, bits: int, group_size: int, symmetric: bool, skip: list[str], format: str) -> Recipe:
    """The recipe the flags describe, with method and format checked against their registries."""
    METHODS.get(method)
    FORMATS.get(format)
    return Recipe(
        method=method,
        scheme=Scheme(bits=bits, group_size=group_size, symmetric=symmetric),
        overrides=tuple(Override(pattern, None) for pattern in skip),
        format=format,
    )


def versions() -> dict:
    return {
        "qtool": __version__,
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("torch", "transformers", "safetensors")},
    }


def run_quantize(
    model: str,
    output: Path,
    method: str,
    bits: int,
    group_size: int,
    symmetric: bool,
    skip: list[str],
    format: str,
    seed: int,
    data_dir: Path | None,
    overwrite: bool,
    trust_remote_code: bool,
    json_output: bool,
    quiet: bool,
) -> None:
    started = time.perf_counter()
    recipe = build_recipe(method, bits, group_size, symmetric, skip, format)
    if output.exists() and not overwrite:
        raise QtoolError(f"output folder {output} already exists; choose another -o or pass --overwrite")
    show = not (quiet or json_output)
    console.quiet_libraries()
    torch.manual_seed(seed)
    folder = resolve_model(model)
    with console.working("loading", str(folder), show):
        fp_model = load_model(folder, dtype=None, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(folder, trust_remote_code)
    with console.progress(show) as bar:
        task = bar.add_task("quantizing", total=None, detail="")
        quantized = quantize_model(
            fp_model, recipe, on_layer=lambda name, done, total: bar.update(task, completed=done, total=total, detail=name)
        )
    record = {
        "recipe": recipe.to_dict(),
        "model": {"source": model, "folder": str(folder)},
        "seed": seed,
        "calibration_fingerprint": None,
        "layers": {
            name: {"scheme": weight.scheme.describe(), **quantized.errors[name]}
            for name, weight in quantized.weights.items()
        },
        "skipped": quantized.skipped,
        "quantize_seconds": round(quantized.seconds, 3),
        "versions": versions(),
    }
    with console.working("writing", str(output), show):
        record["wall_seconds"] = round(time.perf_counter() - started, 3)
        write_checkpoint(output, fp_model, quantized.weights, quantized.skipped, recipe.format, record, tokenizer, overwrite)
    report(folder, output, record, json_output)


def report(source: Path, output: Path, record: dict, json_output: bool) -> None:
    before, after = summarize(source), summarize(output)
    summary = {
        "output": str(output),
        "size_before_bytes": before.total_bytes,
        "size_after_bytes": after.total_bytes,
        "size_ratio": after.total_bytes / before.total_bytes,
        "quantized_bits_per_weight": after.quantized_bits_per_weight,
        "quantized_layers": len(after.layers),
        "dense_linears": after.dense_linears,
        "seconds": record["wall_seconds"],
    }
    if json_output:
        console.print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"qtool quantize → {output}")
    for column in ("size before", "size after", "ratio", "bits/weight (quantized layers)", "layers", "time"):
        table.add_column(column, justify="right")
    table.add_row(
        console.mib(before.total_bytes),
        console.mib(after.total_bytes),
        f"{summary['size_ratio']:.1%}",
        f"{after.quantized_bits_per_weight:.3f}",
        f"{len(after.layers)} quantized, {len(after.dense_linears)} dense",
        f"{record['wall_seconds']:.1f} s",
    )
    console.stdout.print(table)

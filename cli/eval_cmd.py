"""`qtool eval`: perplexity of a model, optionally against a base model on the same windows."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.calibrate.data import load_text, tokenize
from qtool.cli import console
from qtool.cli.devices import choose_device, choose_dtype
from qtool.errors import QtoolError
from qtool.quantize.format import RECORD_FILE
from qtool.quantize.format.checkpoint import read_json
from qtool.runtime.loader import load_model, load_tokenizer
from qtool.runtime.perplexity import PROTOCOL, Perplexity, perplexity, split_windows
from qtool.runtime.resolve import resolve_model
from qtool.runtime.summary import summarize

def run_eval(
    model: str,
    ppl: str,
    seqlen: int,
    max_windows: int | None,
    compare: str | None,
    device: str | None,
    dtype: str | None,
    data_dir: Path | None,
    trust_remote_code: bool,
    json_output: bool,
    quiet: bool,
) -> None:
    if seqlen < 2:
        raise QtoolError(f"--seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise QtoolError(f"--max-windows must be at least 1, got {max_windows}")
    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    show = not (quiet or json_output)
    console.quiet_libraries()
    with console.working("loading", model, show):
        folder = resolve_model(model)
        base_folder = resolve_model(compare) if compare else None
        text = load_text(ppl, data_dir)
        evaluated = load_model(folder, torch_dtype, device, trust_remote_code)
        tokens = tokenize(load_tokenizer(folder, trust_remote_code), text)
        base = load_model(base_folder, torch_dtype, device, trust_remote_code) if base_folder else None
    windows = split_windows(tokens, seqlen, max_windows)
    with console.progress(show) as bar:
        task = bar.add_task("perplexity", total=windows.shape[0], detail=ppl)
        result = perplexity(evaluated, windows, base, on_window=lambda i: bar.update(task, completed=i + 1))
    sizes = summarize(folder)
    summary = {
        **result.to_dict(),
        "dataset": ppl,
        "protocol": PROTOCOL,
        "device": device,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "model": model,
        "size_bytes": sizes.total_bytes,
        "quantized_bits_per_weight": sizes.quantized_bits_per_weight,
    }
    if base_folder is not None:
        summary["base"] = compare
        summary["base_size_bytes"] = summarize(base_folder).total_bytes
    if json_output:
        console.print_json(summary)
    else:
        print_table(summary, result, folder)


def print_table(summary: dict, result: Perplexity, folder: Path) -> None:
    from rich.table import Table

    table = Table(title=f"qtool eval: {summary['dataset']}, {result.windows} windows x {result.seqlen} tokens")
    for column in ("model", "perplexity", "size", "bits/weight (quantized layers)", "quantize time"):
        table.add_column(column, justify="right")
    if result.base_ppl is not None:
        table.add_row(summary["base"], f"{result.base_ppl:.3f}", console.mib(summary["base_size_bytes"]), "-", "-")
    bits = summary["quantized_bits_per_weight"]
    record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else {}
    seconds = record.get("wall_seconds")
    table.add_row(
        summary["model"],
        f"{result.ppl:.3f}",
        console.mib(summary["size_bytes"]),
        "-" if bits is None else f"{bits:.3f}",
        "-" if seconds is None else f"{seconds:.1f} s",
    )
    console.stdout.print(table)
    if result.base_ppl is not None:
        change = result.ppl / result.base_ppl - 1
        console.stdout.print(
            f"perplexity {change:+.2%} vs base, KL {result.kl:.4f} nats/token, top-1 agreement {result.top1_agree:.2%}"
        )
    console.stdout.print(
        f"protocol: {PROTOCOL}; {summary['device']} {summary['dtype']}; evaluation took {result.seconds:.1f} s"
    )

"""A recipe's quality gates, measured: the checkpoint's perplexity against its original's on the
same windows, as a table, and whether every gate holds (the exit code of a CI job)."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.calibrate.data import load_text, tokenize
from qtool.cli import console
from qtool.quantize.recipe_file import Gates
from qtool.runtime.loader import load_model, load_tokenizer, supports_native
from qtool.runtime.perplexity import perplexity, split_windows


def evaluate_gates(checkpoint: Path, base: Path, gates: Gates, device: str, dtype: torch.dtype, data_dir,
                   show: bool) -> dict:
    """{'ppl', 'base_ppl', 'increase_pct', 'gates': [{name, limit, measured, passed}], 'passed'}."""
    with console.working("gates", gates.dataset, show):
        windows = split_windows(tokenize(load_tokenizer(checkpoint), load_text(gates.dataset, data_dir)),
                                gates.seqlen, gates.max_windows)
        models = [load_model(folder, dtype, device, native=supports_native(folder)) for folder in (checkpoint, base)]
        result = perplexity(models[0], windows, models[1])
    increase = 100 * (result.ppl / result.base_ppl - 1)
    rows = [{"name": "max_ppl_increase_pct", "limit": gates.max_ppl_increase_pct, "measured": increase,
             "passed": increase <= gates.max_ppl_increase_pct}]
    if gates.max_ppl is not None:
        rows.append({"name": "max_ppl", "limit": gates.max_ppl, "measured": result.ppl,
                     "passed": result.ppl <= gates.max_ppl})
    return {"ppl": result.ppl, "base_ppl": result.base_ppl, "increase_pct": increase, "windows": result.windows,
            "seqlen": result.seqlen, "dataset": gates.dataset, "gates": rows, "passed": all(r["passed"] for r in rows)}


def print_gates(outcome: dict) -> None:
    from rich.table import Table

    table = Table(title=f"gates: {outcome['dataset']}, {outcome['windows']} windows x {outcome['seqlen']} tokens "
                        f"(ppl {outcome['ppl']:.3f}, original {outcome['base_ppl']:.3f})")
    for column in ("gate", "limit", "measured", "result"):
        table.add_column(column, justify="right")
    for row in outcome["gates"]:
        table.add_row(row["name"], f"{row['limit']:g}", f"{row['measured']:.3f}", "pass" if row["passed"] else "FAIL")
    console.stdout.print(table)

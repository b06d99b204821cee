"""`qtool pareto`: perplexity against bits per weight, for uniform schemes and for allocations at
several budgets, each point a `qtool quantize` and a `qtool eval` run in a child process (so one
point's memory is gone before the next starts, and each is exactly the command a user would run).
Writes pareto.json, pareto.md and pareto.png."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from qtool.calibrate.sensitivity import DEFAULT_CANDIDATES, parse_candidates
from qtool.cli import console
from qtool.errors import FAILURE, QtoolError
from qtool.quantize.format.checkpoint import write_folder_atomically, write_json

DEFAULT_UNIFORM = "3g64,3g32s,4g64s,4g64,4g32"


def run_pareto(model: str, output: Path, budgets: str, uniform: str, candidates: str | None, method: str,
               seqlen: int, max_windows: int, extra: list[str], overwrite: bool, quiet: bool) -> None:
    targets = _budgets(budgets)
    schemes = parse_candidates(uniform)
    if any(scheme is None for scheme in schemes):
        raise QtoolError("--uniform lists quantized schemes; the original model is measured anyway")
    parse_candidates(candidates or DEFAULT_CANDIDATES)
    _require_matplotlib()
    if output.exists() and not overwrite:
        raise QtoolError(f"output folder {output} already exists; choose another -o or pass --overwrite")
    common = ["--method", method, *extra]
    runs = [(f"uniform {name}", "uniform", None, _uniform_flags(scheme))
            for name, scheme in zip(uniform.split(","), schemes)]
    runs += [(f"auto {budget:g}", "allocated", budget,
              ["--bits", f"auto:{budget:g}", "--candidates", candidates or DEFAULT_CANDIDATES]) for budget in targets]
    evaluation = ["--ppl", "wikitext", "--seqlen", str(seqlen), "--max-windows", str(max_windows)]

    def fill(folder: Path) -> None:
        base = _qtool(["eval", model, *evaluation], quiet, "the original model")
        points = []
        for label, kind, budget, flags in runs:
            checkpoint = folder / "checkpoint"
            summary = _qtool(["quantize", model, "-o", str(checkpoint), *common, *flags], quiet, label)
            measured = _qtool(["eval", str(checkpoint), *evaluation], quiet, label)
            points.append({"label": label, "kind": kind, "budget": budget, "flags": [*common, *flags],
                           "bits_per_weight": summary["block_bits_per_weight"], "size_bytes": summary["size_after_bytes"],
                           "ppl": measured["ppl"], "quantize_seconds": summary["seconds"]})
            shutil.rmtree(checkpoint)
        result = {"model": model, "method": method, "evaluation": {"dataset": "wikitext", "seqlen": seqlen,
                  "windows": base["windows"]}, "original_ppl": base["ppl"], "points": points}
        write_json(folder / "pareto.json", result)
        (folder / "pareto.md").write_text(_table(result))
        _plot(result, folder / "pareto.png")

    write_folder_atomically(output, fill, overwrite=overwrite)
    console.stdout.print(_table(json.loads((output / "pareto.json").read_text())), markup=False, highlight=False)


def _budgets(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise QtoolError(f"cannot read --budgets {text!r}; write bits per weight separated by commas, e.g. 3.5,4.25") from None
    if not all(1 < value <= 16 for value in values):
        raise QtoolError(f"--budgets {text!r}: each budget is an average bits per weight above 1 and at most 16")
    return values


def _uniform_flags(scheme) -> list[str]:
    return ["--bits", str(scheme.bits), "--group-size", str(scheme.group_size),
            "--sym" if scheme.symmetric else "--asym"]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QtoolError("qtool pareto draws its plot with matplotlib; pip install 'qtool[plot]'") from None


def _qtool(args: list[str], quiet: bool, label: str) -> dict:
    """One qtool command in a child process, its --json result."""
    if not quiet:
        console.stderr.print(f"pareto: {label}: qtool {' '.join(args[:1])} ...", markup=False, highlight=False)
    done = subprocess.run([sys.executable, "-m", "qtool.cli.app", *args, "--json", "--quiet"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise QtoolError(f"{label}: qtool {args[0]} failed: {last}", FAILURE if done.returncode != 2 else 2)
    return json.loads(done.stdout)


def _table(result: dict) -> str:
    lines = [f"{result['model']}, {result['method']}: WikiText-2 perplexity, {result['evaluation']['windows']} windows x "
             f"{result['evaluation']['seqlen']} tokens (original {result['original_ppl']:.3f})", "",
             "| point | bits/weight (block linears) | size | ppl |", "|---|---|---|---|"]
    for point in sorted(result["points"], key=lambda p: p["bits_per_weight"]):
        lines.append(f"| {point['label']} | {point['bits_per_weight']:.3f} | {point['size_bytes'] / 2**20:.1f} MiB "
                     f"| {point['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("uniform", "o"), ("allocated", "s")):
        points = sorted((p for p in result["points"] if p["kind"] == kind), key=lambda p: p["bits_per_weight"])
        axes.plot([p["bits_per_weight"] for p in points], [p["ppl"] for p in points], marker=marker, label=kind)
        for p in points:
            axes.annotate(p["label"].split(" ", 1)[1], (p["bits_per_weight"], p["ppl"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
    axes.axhline(result["original_ppl"], linestyle="--", color="grey", label="original")
    axes.set_xlabel("bits per weight (decoder blocks' linear layers)")
    axes.set_ylabel("WikiText-2 perplexity")
    axes.set_title(f"{Path(result['model']).name}: {result['method']}, uniform schemes vs allocated")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

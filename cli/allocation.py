"""`qtool quantize --bits auto:B` or `--max-size S`: measure how much each layer of the decoder
blocks suffers under each candidate scheme, choose the schemes that lose least within the budget,
and hand the plan to the method as one override per layer."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.cache import cache_dir
from qtool.calibrate.pipeline import block_linears
from qtool.calibrate.sensitivity import (
    DEFAULT_CANDIDATES, KL_WINDOWS, SENSITIVITIES, candidate_name, fisher_costs, kl_costs, parse_candidates,
)
from qtool.cli import console
from qtool.cli.devices import parse_size
from qtool.errors import QtoolError
from qtool.quantize.allocate import Allocation, allocate, layer_options
from qtool.quantize.format import FORMATS
from qtool.quantize.resume import run_fingerprint
from qtool.quantize.scheme import Recipe
from qtool.runtime.summary import summarize


@dataclass(frozen=True)
class Budget:
    """At most `bits_per_weight` on average over the blocks' linear layers, or at most
    `max_size` bytes of tensors in the whole checkpoint."""

    bits_per_weight: float | None = None
    max_size: int | None = None

    def describe(self) -> str:
        if self.bits_per_weight is not None:
            return f"{self.bits_per_weight:g} bits per weight"
        return f"{self.max_size:,} bytes"


def parse_budget(bits: str | None, max_size: str | None) -> tuple[int | None, Budget | None]:
    """(fixed bits, None) or (None, budget) from --bits (an integer, or auto:B) and --max-size."""
    budget = None
    if bits is not None and bits.startswith("auto:"):
        try:
            average = float(bits.removeprefix("auto:"))
        except ValueError:
            average = math.nan
        if not 1 < average <= 16:
            raise QtoolError(f"cannot read --bits {bits!r}; write auto:B with B the average bits per weight, e.g. auto:4.25")
        budget, bits = Budget(bits_per_weight=average), None
    if max_size is not None:
        if budget is not None:
            raise QtoolError("--bits auto:B and --max-size are two budgets; give one")
        budget = Budget(max_size=parse_size(max_size))
    if bits is not None and budget is not None:
        raise QtoolError("--max-size chooses the bits of every layer; leave out --bits")
    if bits is not None:
        try:
            return int(bits), None
        except ValueError:
            raise QtoolError(f"cannot read --bits {bits!r}; write an integer from 2 to 8, or auto:B (e.g. auto:4.25)") from None
    return None, budget


@dataclass(frozen=True)
class AllocationRequest:
    budget: Budget
    candidates: str = DEFAULT_CANDIDATES
    sensitivity: str = "fisher"


def allocation_request(options: dict) -> tuple[int | None, AllocationRequest | None]:
    """(fixed bits, None) or (None, what to allocate) from the quantize command's options."""
    bits, budget = parse_budget(options["bits"], options["max_size"])
    if budget is None:
        given = [flag for flag, key in (("--candidates", "candidates"), ("--sensitivity", "sensitivity"),
                                        ("--plan-only", "plan_only")) if options.get(key)]
        if given:
            raise QtoolError(f"{given[0]} goes with a budget: --bits auto:B or --max-size S")
        return bits, None
    sensitivity = options["sensitivity"] or "fisher"
    if sensitivity not in SENSITIVITIES:
        raise QtoolError(f"unknown --sensitivity {sensitivity!r}; choose one of: {', '.join(SENSITIVITIES)}")
    candidates = options["candidates"] or DEFAULT_CANDIDATES
    parse_candidates(candidates)  # a bad list is refused before the model is loaded
    return None, AllocationRequest(budget, candidates, sensitivity)


def plan_mixed(request: AllocationRequest, model, lazy, folder: Path, recipe: Recipe, calibration: torch.Tensor,
               fisher, device: str, stored: torch.dtype, show: bool) -> Allocation:
    """The allocation of candidate schemes to the blocks' linear layers within the budget; a
    layer the recipe's overrides name keeps the scheme they give it."""
    candidates = parse_candidates(request.candidates)
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in block_linears(model).items()}
    fixed = {name: recipe.scheme_for(name) for name in shapes if any(o.matches(name) for o in recipe.overrides)}
    weights = {name: out * inp for name, (out, inp) in shapes.items()}
    budget_bytes = _budget_bytes(request.budget, folder, sum(weights.values()), stored)  # refuse before the costs
    fmt = FORMATS.get(recipe.format)
    scale_dtype = fmt.scale_dtype or stored
    costs = _cached_costs(request, candidates, model, lazy, folder, recipe, calibration, fisher, device, scale_dtype,
                          list(shapes), show)
    options = layer_options(shapes, costs, candidates, fmt, scale_dtype, stored.itemsize, fixed)
    return allocate(options, budget_bytes, weights)


def _budget_bytes(budget: Budget, folder: Path, weights: int, stored: torch.dtype) -> int:
    """Bytes the allocated layers may take: the average bits over their weights, or the size
    budget less every other tensor of the checkpoint (written in the model's stored dtype)."""
    if budget.bits_per_weight is not None:
        return math.floor(budget.bits_per_weight * weights / 8)
    others = summarize(folder).total_bytes - weights * stored.itemsize
    if budget.max_size <= others:
        raise QtoolError(f"--max-size {budget.max_size:,} bytes is not more than the tensors left dense "
                         f"({others:,} bytes: embeddings, norms, head); raise it")
    return budget.max_size - others


def _cached_costs(request, candidates, model, lazy, folder, recipe, calibration, fisher, device, scale_dtype,
                  names: list[str], show: bool) -> dict[str, dict[str, float]]:
    """The costs of every layer and candidate, computed once per model, data and settings."""
    settings = {"statistic": f"sensitivity-{request.sensitivity}", "mse": recipe.mse, "scale_dtype": str(scale_dtype),
                "candidates": [candidate_name(c) for c in candidates]}
    key = run_fingerprint(folder, settings, calibration)
    path = cache_dir() / "sensitivity" / f"{key[:24]}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["costs"]
    with console.progress(show) as bar:
        task = bar.add_task(f"sensitivity ({request.sensitivity})", total=len(names), detail="")
        advance = lambda name: bar.update(task, advance=1, detail=name)  # noqa: E731
        if request.sensitivity == "fisher":
            read = (lambda name: lambda: lazy.read(f"{name}.weight", torch.float32)) if lazy is not None else \
                (lambda name: lambda: model.get_submodule(name).weight.detach().float())
            costs = fisher_costs({name: read(name) for name in names}, fisher, candidates, recipe, scale_dtype, advance)
        else:
            costs = _kl_costs(model, lazy, calibration[:KL_WINDOWS], candidates, recipe, device, scale_dtype, advance)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps({"key": key, "costs": costs}))
    scratch.replace(path)
    return costs


def _kl_costs(model, lazy, windows, candidates, recipe, device, scale_dtype, advance):
    """KL costs on the whole model, loaded for the measurement and released after."""
    if lazy is not None:
        lazy.load(model)
    try:
        model.to(device)
        return kl_costs(model, windows.to(device), candidates, recipe, scale_dtype, advance)
    finally:
        model.to("cpu")
        if lazy is not None:
            lazy.release(model)


def allocated_recipe(recipe: Recipe, allocation: Allocation) -> Recipe:
    """`recipe` with the allocation's per-layer schemes ahead of its own overrides."""
    return dataclasses.replace(recipe, overrides=allocation.overrides() + recipe.overrides)


def print_plan(allocation: Allocation, budget: Budget) -> None:
    from rich.table import Table

    table = Table(title=f"mixed precision within {budget.describe()}: {allocation.bits_per_weight:.3f} bits per "
                        f"weight, {allocation.bytes / 2**20:,.1f} MiB of linear layers")
    for column, justify in (("layer", "left"), ("scheme", "left"), ("bits/weight", "right"), ("cost", "right")):
        table.add_column(column, justify=justify)
    for name, option in allocation.choices.items():
        weights = allocation.layer_weights[name]
        table.add_row(name, option.name, f"{8 * option.bytes / weights:.3f}", f"{option.cost:.3e}")
    console.stdout.print(table)


def report_plan(allocation: Allocation, request: AllocationRequest, json_output: bool) -> None:
    """--plan-only: the plan as a table, or as JSON."""
    if json_output:
        console.print_json({"allocation": {**allocation.to_dict(), **dataclasses.asdict(request)}})
    else:
        print_plan(allocation, request.budget)

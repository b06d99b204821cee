"""`qtool quantize`: resolve recipe and model, quantize, write the checkpoint, print a summary."""

from __future__ import annotations

import dataclasses
import platform
import time
from contextlib import contextmanager
from decimal import Decimal
from importlib import metadata
from pathlib import Path

import torch

from qtool import __version__
from qtool.cache import cache_dir
from qtool.calibrate.data import calibration_windows, load_text, tokenize
from qtool.calibrate.kv_scales import observing_transformers_kv
from qtool.calibrate.pipeline import calibrate_sequentially
from qtool.calibrate.data import fingerprint as data_fingerprint
from qtool.calibrate.fisher import StoredFisher, diagonal_fisher, save_fisher
from qtool.calibrate.pipeline import block_linears
from qtool.cli import console
from qtool.cli.allocation import allocated_recipe, allocation_request, plan_mixed, print_plan, report_plan
from qtool.cli.devices import calibration_dtypes, choose_device, limit_device_memory
from qtool.errors import FAILURE, QtoolError
from qtool.quantize.apply import linear_layers, quantize_model
from qtool.quantize.format import FORMATS, write_checkpoint
from qtool.quantize.methods import METHODS
from qtool.quantize.resume import BlockStore, run_fingerprint
from qtool.cli.gates import evaluate_gates, print_gates
from qtool.quantize.recipe_file import RecipeFile, build, check_matches, merge, read_yaml
from qtool.runtime.loader import load_lazily, load_tokenizer, stored_dtype
from qtool.runtime.resolve import resolve_model
from qtool.runtime.summary import summarize


FLAG_PATHS = {  # flag -> where it goes in a recipe's data
    "method": ("method",), "bits": ("scheme", "bits"), "group_size": ("scheme", "group_size"),
    "symmetric": ("scheme", "symmetric"), "calib": ("calibration", "source"), "nsamples": ("calibration", "nsamples"),
    "seqlen": ("calibration", "seqlen"), "seed": ("calibration", "seed"), "format": ("output", "format"),
    "mse": ("mse",), "block_size": ("gptq", "block_size"), "damp": ("gptq", "damp"),
    "act_order": ("gptq", "act_order"), "true_sequential": ("gptq", "true_sequential"),
    "duo_scaling": ("awq", "duo_scaling"), "clip": ("awq", "clip"), "act_bits": ("scheme", "activation_bits"),
    "alpha": ("smoothquant", "alpha"), "kv_cache_dtype": ("output", "kv_cache_dtype"),
}


def build_recipe(options: dict) -> RecipeFile:
    """The recipe of the --recipe file (if any) with the flags given on the command line over it;
    what neither says takes the method's defaults, then qtool's."""
    flags: dict = {}
    for flag, path in FLAG_PATHS.items():
        if options.get(flag) is not None:
            section = flags
            for key in path[:-1]:
                section = section.setdefault(key, {})
            section[path[-1]] = parse_alpha(options[flag]) if flag == "alpha" else options[flag]
    if options.get("no_sensitivity"):
        flags.setdefault("squeezellm", {})["fisher"] = False
    if options.get("outliers") is not None:
        flags.setdefault("squeezellm", {})["outliers"] = parse_fraction(options["outliers"], "--outliers")
    skips = [{"match": pattern, "skip": True} for pattern in options.get("skip") or []]
    if options.get("recipe") is None:
        return build({**flags, "overrides": skips} if skips else flags)
    data, lines = read_yaml(options["recipe"])
    if skips:  # they go first; the file's overrides keep their lines under their new positions
        flags["overrides"] = skips + data.get("overrides", [])
        lines = {(path[0], path[1] + len(skips), *path[2:]) if path[:1] == ("overrides",) and len(path) > 1 else path: line
                 for path, line in lines.items()}
    return build(merge(data, flags), str(options["recipe"]), lines)


def parse_alpha(text: str) -> float | str:
    """--alpha: a number, or auto (searched per group of linears)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise QtoolError(f"--alpha must be a number from 0 to 1 or auto, got {text!r}") from None


def parse_fraction(text: str, flag: str) -> float:
    """0.45% or 0.0045 as a fraction."""
    try:
        return float(Decimal(text.strip()[:-1]) / 100) if text.strip().endswith("%") else float(text)
    except (ValueError, ArithmeticError):
        raise QtoolError(f"cannot read {flag} {text!r}; write a fraction like 0.45% or 0.0045") from None


def versions() -> dict:
    return {
        "qtool": __version__,
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("torch", "transformers", "safetensors")},
    }


def run_quantize(**options) -> None:
    started = time.perf_counter()
    bits, request = allocation_request(options)
    recipe_file = build_recipe({**options, "bits": bits})
    recipe = recipe_file.recipe
    if options["check"] and recipe_file.gates is None:
        raise QtoolError(f"--check evaluates the recipe's gates, and {recipe_file.source} has none; add a gates section")
    output: Path | None = options["output"]
    plan_only = options["plan_only"]
    if output is None and not plan_only:
        raise QtoolError("qtool quantize needs -o OUT, the folder to write the checkpoint to")
    if not plan_only and output.exists() and not options["overwrite"]:
        raise QtoolError(f"output folder {output} already exists; choose another -o or pass --overwrite")
    method = METHODS.get(recipe.method)
    device = choose_device(options["device"])
    device_cap = limit_device_memory(device, options["max_device_memory"])
    show = not (options["quiet"] or options["json_output"])
    trust = options["trust_remote_code"]
    console.quiet_libraries()
    torch.manual_seed(recipe.calibration.seed)
    folder = resolve_model(options["model"])
    stored = stored_dtype(folder)
    weights_dtype, linear_dtype, matmul_dtype = calibration_dtypes(options["calib_dtype"], device, stored)
    calibrated = method.needs_calibration(recipe)
    kv_scales = recipe.kv_cache_dtype != "auto"
    needs_data = calibrated or request is not None or kv_scales
    if not needs_data:
        weights_dtype, linear_dtype, matmul_dtype = stored, stored, None
    calib_matmul = str(matmul_dtype or weights_dtype).removeprefix("torch.") if needs_data else None
    with console.working("loading", str(folder), show):
        model, lazy = load_lazily(folder, weights_dtype, trust, linear_dtype)
        check_matches(recipe_file, list(linear_layers(model)))
        tokenizer = load_tokenizer(folder, trust)
        calibration = fingerprint = None
        if needs_data:
            spec = recipe.calibration
            text = load_text(spec.source, options["data_dir"])
            calibration = calibration_windows(tokenize(tokenizer, text), spec.nsamples, spec.seqlen, spec.seed)
            fingerprint = data_fingerprint(calibration)
    store = sensitivity = allocation = None
    if calibrated and not method.sequential or request is not None and request.sensitivity == "fisher":
        sensitivity = cached_fisher(model, lazy, folder, calibration, device, matmul_dtype, calib_matmul,
                                    options["fisher"], show)
    if request is not None:
        allocation = plan_mixed(request, model, lazy, folder, recipe, calibration, sensitivity, device, stored, show)
        recipe = allocated_recipe(recipe, allocation)
        if plan_only:
            report_plan(allocation, request, options["json_output"])
            return
        if show:
            print_plan(allocation, request.budget)
    if method.sequential:  # every calibrated run keeps per-block state, so --resume can pick it up
        work = output.parent / f".{output.name}.qtool-work"
        decisive = {**recipe.to_dict(), "calibration_matmul_dtype": calib_matmul}
        store = BlockStore(work, run_fingerprint(folder, decisive, calibration), options["resume"])
    scale_dtype = FORMATS.get(recipe.format).scale_dtype or stored
    cap = f"the {options['max_device_memory']} of --max-device-memory" if device_cap else "what the device has"
    with out_of_device_memory_as_failure(device, cap), observing_kv(model, kv_scales) as kv_amax:
        with console.progress(show) as bar:
            task = bar.add_task(f"quantizing ({recipe.method})", total=None, detail="")
            quantized = quantize_model(
                model, recipe, calibration if calibrated else None, device, scale_dtype=scale_dtype, store=store,
                sensitivity=sensitivity if calibrated and not method.sequential else None,
                offload_activations=options["offload_activations"], matmul_dtype=matmul_dtype, weights=lazy,
                on_layer=lambda name, done, total: bar.update(task, completed=done, total=total, detail=name),
                on_block=lambda index, count: bar.update(
                    task, description=f"quantizing ({recipe.method}) block {index + 1}/{count}"),
            )
        if kv_scales and not method.sequential:  # no calibration pass ran: one for the KV cache alone
            with console.working("measuring KV-cache scales", str(folder), show):
                calibrate_sequentially(model, calibration, lambda run: None, device, matmul_dtype=matmul_dtype,
                                       offload_activations=options["offload_activations"], weights=lazy)
    record = {
        "recipe": recipe.to_dict(),
        "model": {"source": options["model"], "folder": str(folder)},
        "seed": recipe.calibration.seed,
        "calibration_fingerprint": fingerprint,
        "device": device,
        "max_device_memory_bytes": device_cap,
        "calibration_matmul_dtype": calib_matmul,
        "fisher_file": None if sensitivity is None else str(sensitivity.path),
        "allocation": None if allocation is None else {**allocation.to_dict(), **dataclasses.asdict(request)},
        "layers": {
            name: {"scheme": weight.scheme.describe(), **quantized.errors[name]}
            for name, weight in quantized.weights.items()
        },
        "skipped": quantized.skipped,
        "quantize_seconds": round(quantized.seconds, 3),
        **peak_memory(device),
        "versions": versions(),
    }
    with console.working("writing", str(output), show):
        record["wall_seconds"] = round(time.perf_counter() - started, 3)
        write_checkpoint(output, model, quantized.weights, quantized.skipped, recipe.format, record, tokenizer,
                         options["overwrite"], dtype=stored, lazy=lazy,
                         read_weight=store.read if store is not None else None,
                         kv_scales=kv_amax.scale_tensors() if kv_scales else None)
    if store is not None:
        store.clear()
    gates = None
    if options["check"]:
        gates = evaluate_gates(output, folder, recipe_file.gates, device, torch.float32 if device == "cpu" else torch.float16,
                               options["data_dir"], show)
    report(folder, output, record, options["json_output"], gates)
    if gates is not None and not gates["passed"]:
        raise SystemExit(FAILURE)


@contextmanager
def observing_kv(model, wanted: bool):
    """The K and V amax of every attention call while inside, when `wanted` (else nothing)."""
    if not wanted:
        yield None
        return
    with observing_transformers_kv(model) as amax:
        yield amax


@contextmanager
def out_of_device_memory_as_failure(device: str, cap: str):
    """Running out of device memory is a one-line failure that says what to change."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise QtoolError(
            f"one block and its activations need more than {cap} on {device}; lower --nsamples or "
            f"--seqlen, add --offload-activations, or allow more memory", FAILURE,
        ) from None


def cached_fisher(model, lazy, folder: Path, calibration: torch.Tensor, device: str, matmul_dtype,
                  calib_matmul: str, path: Path | None, show: bool) -> StoredFisher:
    """The Fisher information of the blocks' linears on the calibration windows: read from `path`
    (or the cache, keyed by model files, windows and precision) when computed before, else
    computed and saved there first."""
    key = run_fingerprint(folder, {"statistic": "diagonal-fisher", "matmul_dtype": calib_matmul}, calibration)
    path = path or cache_dir() / "fisher" / f"{key[:24]}.safetensors"
    if not path.exists():
        targets = list(block_linears(model))  # every linear of the blocks: one file serves any recipe
        with console.progress(show) as bar:
            task = bar.add_task("Fisher information", total=len(calibration), detail="")
            fisher = diagonal_fisher(model, calibration, targets, device, matmul_dtype=matmul_dtype, weights=lazy,
                                     on_progress=lambda done, total: bar.update(task, completed=done))
        save_fisher(path, fisher, key)
        del fisher
    return StoredFisher(path, key)


def peak_memory(device: str) -> dict:
    """Peak memory of this process so far: resident host memory, and device memory on CUDA."""
    import resource

    peaks = {"peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        peaks["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return peaks


ERROR_KINDS = {"weight": "weights", "output": "outputs", "fisher-weighted weight": "weights x Fisher"}


def worst_layers(layers: dict, count: int = 8) -> list[dict]:
    ranked = sorted(layers.items(), key=lambda item: item[1]["error"], reverse=True)[:count]
    return [{"layer": name, "scheme": entry["scheme"], "error": entry["error"], "kind": entry["kind"]}
            for name, entry in ranked]


def report(source: Path, output: Path, record: dict, json_output: bool, gates: dict | None = None) -> None:
    before, after = summarize(source), summarize(output)
    summary = {
        "output": str(output),
        "size_before_bytes": before.total_bytes,
        "size_after_bytes": after.total_bytes,
        "size_ratio": after.total_bytes / before.total_bytes,
        "quantized_bits_per_weight": after.quantized_bits_per_weight,
        "block_bits_per_weight": after.block_bits_per_weight,
        "quantized_layers": len(after.layers),
        "dense_linears": after.dense_linears,
        "seconds": record["wall_seconds"],
        **{key: value for key, value in record.items() if key.startswith("peak_")},
        "worst_layers": worst_layers(record["layers"]),
        **({"gates": gates} if gates is not None else {}),
    }
    if json_output:
        console.print_json(summary)
        return
    if gates is not None:
        print_gates(gates)
    from rich.table import Table

    errors = Table(title="largest relative errors (outputs: on the calibration data)")
    for column, justify in (("layer", "left"), ("scheme", "left"), ("relative error", "right"), ("of", "left")):
        errors.add_column(column, justify=justify)
    for row in summary["worst_layers"]:
        errors.add_row(row["layer"], row["scheme"], f"{row['error']:.3e}", ERROR_KINDS.get(row["kind"], row["kind"]))
    console.stdout.print(errors)

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

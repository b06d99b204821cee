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
from qtool.calibrate.kv_scales import kv_cache_dtype as kv_cache_dtype_of
from qtool.runtime.kv_cache import use_kv_cache_dtype
from qtool.runtime.loader import load_model, load_tokenizer, supports_native
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
    generate: str | None = None,
    max_tokens: int = 64,
    gates: Path | None = None,
    kv_cache_dtype: str = "auto",
) -> None:
    kv_cache_dtype_of(kv_cache_dtype)  # refuse a bad value before anything loads
    if generate is not None:
        return run_generate(model, generate, max_tokens, device, dtype, trust_remote_code, json_output, quiet,
                            kv_cache_dtype)
    if gates is not None:
        return run_gates(model, gates, compare, device, dtype, data_dir, json_output, quiet)
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
        native = supports_native(folder, trust_remote_code)
        evaluated = load_model(folder, torch_dtype, device, trust_remote_code, native)
        tokenizer = load_tokenizer(folder, trust_remote_code)
        use_kv_cache_dtype(evaluated, kv_cache_dtype, tokenizer, data_dir)
        tokens = tokenize(tokenizer, text)
        base = None
        if base_folder is not None:
            base = load_model(base_folder, torch_dtype, device, trust_remote_code,
                              supports_native(base_folder, trust_remote_code))
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
        "runtime": "qtool" if native else "transformers",
        "kv_cache_dtype": kv_cache_dtype,
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
    if summary["runtime"] == "transformers":
        console.stdout.print("measured through transformers' model code: serving and `--generate` need a model "
                             "of the Llama family (llama, mistral, qwen2, qwen3)")


def run_generate(model: str, prompt: str, max_tokens: int, device: str | None, dtype: str | None,
                 trust_remote_code: bool, json_output: bool, quiet: bool, kv_cache_dtype: str = "auto") -> None:
    """A greedy completion of `prompt` through qtool's runtime."""
    from qtool.runtime.engine import LLM, SamplingParams

    if max_tokens < 1:
        raise QtoolError(f"--max-tokens must be at least 1, got {max_tokens}")
    device = choose_device(device)
    console.quiet_libraries()
    with console.working("loading", model, not (quiet or json_output)):
        llm = LLM(model, device, choose_dtype(dtype, device), trust_remote_code, kv_cache_dtype)
    output = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    if json_output:
        console.print_json({"prompt": prompt, "text": output.text, "token_ids": output.token_ids,
                            "finish_reason": output.finish_reason, "device": device})
    else:
        console.stdout.print(prompt + output.text, markup=False, highlight=False)


def run_gates(model: str, recipe_path: Path, compare: str | None, device: str | None, dtype: str | None,
              data_dir: Path | None, json_output: bool, quiet: bool) -> None:
    """The recipe's gates on a checkpoint, against --compare or the model its qtool.json names;
    exit 1 when one fails."""
    from qtool.cli.gates import evaluate_gates, print_gates
    from qtool.errors import FAILURE
    from qtool.quantize.recipe_file import load_recipe

    recipe_file = load_recipe(recipe_path)
    if recipe_file.gates is None:
        raise QtoolError(f"{recipe_path} has no gates section to evaluate")
    folder = resolve_model(model)
    record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else {}
    base = compare or record.get("model", {}).get("source")
    if base is None:
        raise QtoolError(f"{model} does not say what it was quantized from; give the original with --compare")
    device = choose_device(device)
    console.quiet_libraries()
    outcome = evaluate_gates(folder, resolve_model(base), recipe_file.gates, device, choose_dtype(dtype, device),
                             data_dir, not (quiet or json_output))
    if json_output:
        console.print_json({"model": model, "base": base, **outcome})
    else:
        print_gates(outcome)
    if not outcome["passed"]:
        raise SystemExit(FAILURE)
"""`qtool bench`: throughput and latency of a checkpoint (or a random-weight model of a config)
through qtool's runtime at several concurrencies, optionally beside a base model on the same load."""

from __future__ import annotations

import gc
import platform

import torch

from qtool.calibrate.kv_scales import kv_cache_dtype as kv_cache_dtype_of
from qtool.cli import console
from qtool.cli.devices import choose_device, choose_dtype, parse_size
from qtool.errors import QtoolError
from qtool.runtime.bench import LoadResult, run_load, synthetic_config, synthetic_model
from qtool.runtime.engine import Engine
from qtool.runtime.kv_cache import use_kv_cache_dtype


def run_bench(checkpoint: str | None, batch_sizes: list[int], prompt_len: int, output_len: int, compare: str | None,
              synthetic: str | None, bits: int, group_size: int, device: str | None, dtype: str | None,
              trust_remote_code: bool, json_output: bool, quiet: bool, kv_cache_dtype: str = "auto",
              kv_cache_memory: str | None = None) -> None:
    if (checkpoint is None) == (synthetic is None):
        raise QtoolError("give a checkpoint, or --synthetic CONFIG for a random-weight model, not both")
    if not batch_sizes or min(batch_sizes) < 1 or prompt_len < 1 or output_len < 1:
        raise QtoolError("--batch-sizes, --prompt-len and --output-len must be positive")
    kv_cache_dtype_of(kv_cache_dtype)
    engine_options = {"max_sequences": max(batch_sizes)}
    if kv_cache_memory is not None:
        engine_options["cache_bytes"] = parse_size(kv_cache_memory)
    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    show = not (quiet or json_output)
    console.quiet_libraries()
    targets = [checkpoint or f"synthetic {synthetic} W{bits} g{group_size}"]
    if compare:
        targets.append(compare if checkpoint else f"synthetic {synthetic} {str(torch_dtype).removeprefix('torch.')}")
    rows = {}
    for index, target in enumerate(targets):
        with console.working("loading", target, show):
            engine = _engine(checkpoint if index == 0 else compare, synthetic, bits if index == 0 else None, group_size,
                             device, torch_dtype, trust_remote_code, kv_cache_dtype, engine_options)
        # warm up with the same loads on other prompts (the prefix cache would serve the measured ones): every
        # token count the measured steps see (chunked prefills, mixed steps, the batch shrinking at the end)
        # has its kernels compiled and tuned, and its CUDA graph captured, outside the measurement
        for size in batch_sizes:
            run_load(engine, size, prompt_len, output_len, seed=1)
        with console.working("measuring", target, show):
            rows[target] = [run_load(engine, size, prompt_len, output_len).to_dict() for size in batch_sizes]
        del engine
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    summary = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
               "dtype": str(torch_dtype).removeprefix("torch."), "kv_cache_dtype": kv_cache_dtype,
               "prompt_len": prompt_len, "output_len": output_len,
               "results": rows}
    if json_output:
        console.print_json(summary)
    else:
        _table(summary)


def _engine(source, synthetic, bits, group_size, device, dtype, trust_remote_code, kv_cache_dtype, options) -> Engine:
    if synthetic is not None:
        model = synthetic_model(synthetic_config(synthetic), bits, group_size, dtype, device)
        use_kv_cache_dtype(model, kv_cache_dtype)  # random weights: scales measured on random tokens
        return Engine(model, None, device, dtype, **options)
    from qtool.runtime.engine import LLM

    return LLM(source, device, dtype, trust_remote_code, kv_cache_dtype, **options).engine


def _table(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"qtool bench: {summary['device']} {summary['dtype']}, prompts of {summary['prompt_len']}, "
                        f"{summary['output_len']} new tokens each")
    columns = ("model", "concurrency", "output tok/s", "decode tok/s", "prefill tok/s", "TTFT p50 ms", "ITL p50 / p99 ms",
               "peak memory", "KV use", "most running")
    for column in columns:
        table.add_column(column, justify="right")
    for target, results in summary["results"].items():
        for row in results:
            table.add_row(target, str(row["concurrency"]), f"{row['output_tokens_per_s']:.1f}",
                          f"{row['decode_tokens_per_s']:.1f}", f"{row['prefill_tokens_per_s']:.1f}",
                          f"{row['ttft_ms_p50']:.1f}", f"{row['itl_ms_p50']:.1f} / {row['itl_ms_p99']:.1f}",
                          console.mib(row["peak_memory_bytes"]), f"{row['kv_utilisation']:.1%}", str(row["max_running"]))
    console.stdout.print(table)


__all__ = ["run_bench", "LoadResult"]

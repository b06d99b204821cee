"""`qtool inspect`: what a checkpoint holds, layer by layer; with --tp, what vLLM makes of it."""

from __future__ import annotations

from pathlib import Path

from qtool.cli import console
from qtool.errors import QtoolError
from qtool.quantize.format import vllm
from qtool.runtime.summary import ModelSummary, summarize


def run_inspect(checkpoint: Path, tp: int | None, json_output: bool) -> None:
    if not (checkpoint / "config.json").is_file():
        raise QtoolError(f"{checkpoint} is not a checkpoint folder: it has no config.json")
    if tp is not None and tp < 1:
        raise QtoolError(f"--tp must be a positive number of GPUs, got {tp}")
    summary = summarize(checkpoint)
    plans = vllm_plans(summary, tp) if tp is not None else None
    if json_output:
        data = {"checkpoint": str(checkpoint), **summary.to_dict()}
        if plans is not None:
            data["tp"] = tp
            for layer, plan in zip(data["layers"], plans):
                layer["vllm"] = {"parallel": plan.parallel, "rank_shape": list(plan.rank_shape),
                                 "kernels": plan.kernels, "warnings": plan.warnings}
            data["vllm_warnings"] = sum(len(plan.warnings) for plan in plans)
        console.print_json(data)
        return
    print_table(checkpoint, summary, plans)


def vllm_plans(summary: ModelSummary, tp: int) -> list[vllm.LayerPlan]:
    if summary.format is None:
        raise QtoolError("--tp checks quantized checkpoints; this folder has no quantization_config")
    layers = [vllm.Layer(layer.name, layer.shape, layer.spec, layer.act_order) for layer in summary.layers]
    base = vllm.base_scheme(summary.format, summary.quantization_config)
    return vllm.plan(summary.format, layers, tp, base, tuple(summary.dense_linears))


def print_table(checkpoint: Path, summary: ModelSummary, plans: list[vllm.LayerPlan] | None) -> None:
    from rich.table import Table

    table = Table(title=f"qtool inspect {checkpoint}")
    for column, justify in (("layer", "left"), ("shape", "right"), ("scheme", "left"), ("bits/weight", "right"), ("size", "right")):
        table.add_column(column, justify=justify)
    for layer in summary.layers:
        table.add_row(layer.name, "x".join(map(str, layer.shape)), layer.scheme + (" act-order" if layer.act_order else ""),
                      f"{layer.bits_per_weight:.3f}", console.mib(layer.bytes))
    console.stdout.print(table)
    quantized_bytes = sum(layer.bytes for layer in summary.layers)
    bits = summary.quantized_bits_per_weight
    console.stdout.print(
        f"{len(summary.layers)} quantized layers ({console.mib(quantized_bytes)}"
        + (f", {bits:.3f} bits/weight; {summary.block_bits_per_weight:.3f} over the blocks' linears with the dense ones"
           if bits is not None else "")
        + f"); dense linears: {', '.join(summary.dense_linears) or 'none'}; total {console.mib(summary.total_bytes)}"
    )
    if plans is not None:
        print_plans(plans)


def print_plans(plans: list[vllm.LayerPlan]) -> None:
    from rich.table import Table

    table = Table(title="vLLM: per-rank shapes and kernels")
    for column, justify in (("layer", "left"), ("per rank", "right"), *((f"kernel {gpu}", "left") for gpu in vllm.GPUS)):
        table.add_column(column, justify=justify, no_wrap=column == "layer")
    for plan in plans:
        table.add_row(plan.name, f"{'x'.join(map(str, plan.rank_shape))} {plan.parallel}",
                      *(plan.kernels[gpu] for gpu in vllm.GPUS))
    console.stdout.print(table)
    for plan in plans:
        for warning in plan.warnings:
            console.stdout.print(f"warning: {plan.name}: {warning}", highlight=False)

"""`qtool`: quantize, evaluate and inspect LLM checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from qtool.errors import FAILURE, QtoolError

app = typer.Typer(
    help="Quantize LLM weights to packed INT4/INT8 checkpoints and measure what they lose.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# options several commands share
DATA_DIR = typer.Option(None, help="Folder with offline data sets (else $QTOOL_DATA_DIR).")
DEVICE = typer.Option(None, help="cpu or cuda (default: cuda when present).")
DTYPE = typer.Option(None, help="float32, float16 or bfloat16 (default: float32 on cpu, float16 on cuda).")
TRUST_REMOTE_CODE = typer.Option(False, help="Allow model code from the checkpoint folder.")
JSON_OUTPUT = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else there.")
QUIET = typer.Option(False, "--quiet", help="No progress output.")
KV_CACHE_DTYPE = typer.Option("auto", help="KV cache: auto (the activations' dtype) or fp8 (float8 e4m3 with per-head scales: twice the tokens; the checkpoint's scales, else measured at load).")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Model folder, .gguf file, alias (smollm2-135m) or hub id."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder to write the checkpoint to (required unless --plan-only)."),
    recipe: Optional[Path] = typer.Option(None, help="A recipe YAML file; flags given here override it."),
    method: Optional[str] = typer.Option(None, help="Quantization method: rtn (the default), gptq, awq, awq+gptq, squeezellm, smoothquant or smoothquant+gptq (W8A8)."),
    bits: Optional[str] = typer.Option(None, help="Bits per weight, 2-8 (default 4), or auto:B to choose each layer's scheme for an average of B bits per weight over the decoder blocks' linear layers."),
    max_size: Optional[str] = typer.Option(None, help="Choose each layer's scheme so that the checkpoint's tensors take at most this much (e.g. 80MB)."),
    candidates: Optional[str] = typer.Option(None, help="With auto bits or --max-size: the schemes a layer may get, e.g. 3g64,4g64s,8cs,dense (BITSgGROUP, s for symmetric, c per channel; default 3g64,4g128,4g64,4g32,8cs,dense)."),
    sensitivity: Optional[str] = typer.Option(None, "--sensitivity", help="With auto bits or --max-size: how a layer's loss under a scheme is measured: fisher (Fisher-weighted rounding error, the default) or kl (the model's KL divergence with that layer quantized alone)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="With auto bits or --max-size: print the per-layer plan and stop."),
    group_size: Optional[int] = typer.Option(None, help="Input columns per scale (default 64) or, for squeezellm, per look-up table (default -1); -1 for one per output channel."),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric grid (no zero point) or asymmetric (the default)."),
    skip: list[str] = typer.Option([], help="Regex of layer names to leave unquantized (repeatable)."),
    mse: Optional[bool] = typer.Option(None, "--mse/--no-mse", help="Search each group's scale for the least rounding error (shrinking its min-max range up to 80%) instead of min-max."),
    format: Optional[str] = typer.Option(None, "--format", help="Checkpoint format: compressed-tensors (vLLM, transformers; the default), gptq (AutoGPTQ/GPTQModel v1: 2, 3, 4 or 8 bits), awq (AutoAWQ gemm layout: 4 bits, a group size) or qtool (look-up tables and outliers; the default for squeezellm)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text: wikitext2, wiki-leads (the default) or a .txt/.jsonl/.parquet file."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration windows (default: 128; 100 for squeezellm)."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (default 512)."),
    seed: Optional[int] = typer.Option(None, help="Seed for everything random (calibration windows included; default 0)."),
    data_dir: Optional[Path] = DATA_DIR,
    device: Optional[str] = typer.Option(None, help="Where calibration runs: cpu or cuda (default: cuda when present)."),
    block_size: Optional[int] = typer.Option(None, help="GPTQ: columns per lazy update block (default 128)."),
    damp: Optional[float] = typer.Option(None, help="GPTQ: damping, a fraction of the mean Hessian diagonal (default 0.01)."),
    act_order: Optional[str] = typer.Option(None, help="GPTQ column order: static (the default: largest Hessian diagonal first, groups contiguous), group (g_idx written) or none."),
    true_sequential: Optional[bool] = typer.Option(None, "--true-sequential/--no-true-sequential", help="GPTQ: calibrate each group of linears after the ones before it are quantized."),
    duo_scaling: Optional[bool] = typer.Option(None, "--duo-scaling/--no-duo-scaling", help="AWQ: scales from activation and weight magnitudes (else activations alone)."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="AWQ: search each group's clipping range for the least output error."),
    act_bits: Optional[int] = typer.Option(None, help="Quantize activations too: 8 for int8 per token, at run time (W8A8; 8-bit symmetric per-channel weights; the default of smoothquant)."),
    alpha: Optional[str] = typer.Option(None, help="SmoothQuant: how much of the activations' range moves into the weights, 0 to 1 (default 0.8), or auto: searched for each group of linears for the least int8 output error on the calibration data."),
    kv_cache_dtype: Optional[str] = typer.Option(None, help="fp8: also measure per-head float8 KV-cache scales on the calibration data and write them (compressed-tensors kv_cache_scheme, as vLLM reads it)."),
    outliers: Optional[str] = typer.Option(None, help="SqueezeLLM: fraction of each layer's weights kept exactly as sparse outliers, e.g. 0.45% (0: dense only)."),
    no_sensitivity: bool = typer.Option(False, "--no-sensitivity", help="SqueezeLLM: k-means with all weights alike (not weighted by Fisher information)."),
    fisher: Optional[Path] = typer.Option(None, help="SqueezeLLM: file for the Fisher information: read when it exists (and matches model and data), else computed and written there (default: a cache keyed by both)."),
    offload_activations: bool = typer.Option(False, help="Keep calibration activations on the CPU between blocks (long calibration sets)."),
    max_device_memory: Optional[str] = typer.Option(None, help="Cap on CUDA memory for the run (e.g. 20GiB): calibration keeps one block and its activations there."),
    calib_dtype: str = typer.Option("auto", help="Precision of calibration matmuls: auto (bfloat16 on a CPU with native bf16, weights and statistics in float32; the checkpoint's dtype on a GPU), float32, bfloat16, float16, or float64 (everything in float64: a reference that CPUs and GPUs compute alike, slowly)."),
    resume: bool = typer.Option(False, help="Continue an interrupted calibrated run from its last finished block."),
    check: bool = typer.Option(False, "--check", help="After quantizing, evaluate the recipe's gates; exit 1 when one fails."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = JSON_OUTPUT,
    quiet: bool = QUIET,
):
    """Quantize MODEL and write a packed checkpoint to OUTPUT."""
    options = dict(locals())
    from qtool.cli.quantize_cmd import run_quantize

    run_quantize(**options)


@app.command(name="eval")
def evaluate(
    model: str = typer.Argument(..., help="Checkpoint or model: folder, .gguf file, alias or hub id."),
    ppl: str = typer.Option("wikitext", help="Data set for perplexity: wikitext2, wiki-leads or a file."),
    seqlen: int = typer.Option(2048, help="Tokens per window."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    compare: Optional[str] = typer.Option(None, help="Base model to compare against on the same windows."),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    data_dir: Optional[Path] = DATA_DIR,
    generate: Optional[str] = typer.Option(None, help="Instead of perplexity: print the greedy completion of this prompt."),
    max_tokens: int = typer.Option(64, help="With --generate: new tokens at most."),
    gates: Optional[Path] = typer.Option(None, help="Evaluate this recipe's gates against the original (--compare, else the model qtool.json names); exit 1 when one fails."),
    kv_cache_dtype: str = KV_CACHE_DTYPE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = JSON_OUTPUT,
    quiet: bool = QUIET,
):
    """Perplexity of MODEL, and with --compare its KL divergence and top-1 agreement with a base model;
    with --generate, a completion through qtool's runtime."""
    options = dict(locals())
    from qtool.cli.eval_cmd import run_eval

    run_eval(**options)


@app.command()
def bench(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint or model (folder, alias or hub id); or use --synthetic."),
    batch_sizes: list[int] = typer.Option([1, 8, 64], help="Concurrent requests of each load (repeatable)."),
    prompt_len: int = typer.Option(128, help="Prompt tokens of every request (random ids)."),
    output_len: int = typer.Option(256, help="Tokens every request generates (EOS ignored)."),
    compare: Optional[str] = typer.Option(None, help="A base model run on the same loads (with --synthetic: any value runs the fp16 model of the config)."),
    synthetic: Optional[str] = typer.Option(None, help="A random-weight model of this config (llama3-8b, llama3-1b or a config.json) instead of a checkpoint."),
    bits: int = typer.Option(4, help="With --synthetic: bits of the quantized linears."),
    group_size: int = typer.Option(64, help="With --synthetic: their group size."),
    kv_cache_dtype: str = KV_CACHE_DTYPE,
    kv_cache_memory: Optional[str] = typer.Option(None, help="Memory for the KV cache, e.g. 4GiB (default: what the device has left, 90% in all)."),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = JSON_OUTPUT,
    quiet: bool = QUIET,
):
    """Throughput and latency through qtool's runtime: tokens/s, time to first token, inter-token latency, memory."""
    options = dict(locals())
    from qtool.cli.bench_cmd import run_bench

    run_bench(**options)


@app.command(name="serve")
def serve_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint or model of the Llama family (folder, alias or hub id)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer KEY' on /v1 requests (or $QTOOL_API_KEY)."),
    smoke: bool = typer.Option(False, "--smoke", help="Start, fire concurrent chat and completion requests (whole and streamed), check them, report, exit 0 or 1."),
    smoke_requests: int = typer.Option(8, help="With --smoke: requests of each kind."),
    kv_cache_dtype: str = KV_CACHE_DTYPE,
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    quiet: bool = QUIET,
):
    """Serve CHECKPOINT through an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)."""
    options = dict(locals())
    from qtool.cli.serve_cmd import run_serve

    run_serve(**options)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pareto(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, .gguf file, alias or hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for pareto.json, pareto.md and pareto.png."),
    budgets: str = typer.Option("3.0,3.5,4.0,4.5,5.0", help="Average bits per weight to allocate at, comma-separated."),
    uniform: str = typer.Option("3g64,3g32s,4g64s,4g64,4g32", help="Uniform schemes to compare against (as --candidates writes them)."),
    candidates: Optional[str] = typer.Option(None, help="The schemes allocations choose from (as quantize's --candidates)."),
    method: str = typer.Option("gptq", help="The method under every point."),
    seqlen: int = typer.Option(2048, help="Perplexity: tokens per window."),
    max_windows: int = typer.Option(40, help="Perplexity: windows evaluated."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    quiet: bool = QUIET,
):
    """Perplexity against bits per weight: uniform schemes and allocations at several budgets, as a
    table and a plot. Arguments after -- go to every qtool quantize run (e.g. -- --mse --nsamples 64)."""
    from qtool.cli.pareto_cmd import run_pareto

    run_pareto(model, output, budgets, uniform, candidates, method, seqlen, max_windows, list(ctx.args), overwrite, quiet)


recipe_app = typer.Typer(help="Check and show recipe files.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("validate")
def recipe_validate(
    path: Path = typer.Argument(..., help="The recipe YAML file."),
    model: Optional[str] = typer.Option(None, help="Also check it against this model's layers (overrides that match nothing, group sizes)."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
):
    """Check a recipe strictly: unknown keys, wrong types, impossible values, and with --model its regexes."""
    from qtool.cli.recipe_cmd import run_validate

    run_validate(path, model, trust_remote_code)


@recipe_app.command("show")
def recipe_show(
    path: Path = typer.Argument(..., help="The recipe YAML file."),
    model: Optional[str] = typer.Option(None, help="Also list the scheme each of this model's linear layers gets."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = JSON_OUTPUT,
):
    """The effective recipe, every default filled in; with --model, the scheme of every layer."""
    from qtool.cli.recipe_cmd import run_show

    run_show(path, model, trust_remote_code, json_output)


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Check vLLM's tensor-parallel rules for this many GPUs and name each layer's vLLM kernel."),
    json_output: bool = JSON_OUTPUT,
):
    """Per-layer schemes, shapes, sizes and bits per weight of a checkpoint; with --tp, what vLLM makes of it."""
    from qtool.cli.inspect_cmd import run_inspect

    run_inspect(checkpoint, tp, json_output)


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="Quantized checkpoint folder (any format qtool reads)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the converted checkpoint to."),
    format: str = typer.Option(..., "--format", help="Target format: compressed-tensors, gptq, awq or qtool."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = JSON_OUTPUT,
    quiet: bool = QUIET,
):
    """Rewrite CHECKPOINT in another format; refused, with the reason, where that would change a weight."""
    from qtool.cli.convert_cmd import run_convert

    run_convert(checkpoint, output, format, overwrite, trust_remote_code, json_output, quiet)


@app.command()
def version():
    """Print qtool's version."""
    from qtool import __version__

    print(__version__)


def main(argv: list[str] | None = None) -> int:
    """Entry point: QtoolError becomes one line on stderr and exit code 2 (bad input) or 1 (failure);
    usage errors keep typer's own message and exit code 2."""
    try:
        app(args=argv, prog_name="qtool")
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    except QtoolError as error:
        print(f"qtool: error: {error}", file=sys.stderr)
        return error.exit_code
    except MemoryError:
        print("qtool: error: out of memory; use a smaller model, --seqlen or --max-windows", file=sys.stderr)
        return FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())

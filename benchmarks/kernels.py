"""Speed of qtool's quantized matmul kernel on a GPU, against fp16 cuBLAS (`F.linear`) and torch's
own int4 kernel (`aten._weight_int4pack_mm`, group 128), on Llama-3-8B layer shapes.

Every product is timed as the median replay of a CUDA graph that runs it once on each of several
copies of its inputs (more bytes than the L2 cache holds), so neither launch gaps nor cache hits
flatter it. The memory-bandwidth floor of each product is its bytes (weights, scales, tables,
outliers, activations in and out) over the bandwidth of a large device-to-device copy measured on
the same GPU. Writes kernels_<gpu>.json, kernels_<gpu>.md and kernels_<gpu>.png to --out.

usage: python benchmarks/kernels.py [--out benchmarks/results] [--tokens 1 16 ...] [--shapes 4096x14336 ...]
                                   [--compile-jobs 16]
       python benchmarks/kernels.py --merge run1/kernels_h200.json run2/kernels_h200.json [--out ...]
Compiling every scheme's candidates takes minutes; --compile-jobs N does it first in N processes at
once, each tuning (so compiling) one scheme at one token count on the smallest shape (the kernels
compile for no particular shape), and the one process that times then finds Triton's cache warm:
the full table in about 400 s on an H200. Or measure a few shapes a run and --merge the runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from graph_timing import graph_us
from qtool.kernels.quant_matmul import _TUNER, KernelWeight, copies_to_fill_l2, quant_matmul, with_fragments
from qtool.quantize import packing

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 8192)]  # (in K, out N)
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]


def uniform(n: int, k: int, bits: int, group: int, symmetric: bool) -> KernelWeight:
    groups = 1 if group == -1 else k // group
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int32, device="cuda")
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, groups), dtype=torch.int32, device="cuda")
    scales = torch.rand(n, groups, device="cuda", dtype=torch.float16) * 0.01
    weight = KernelWeight.from_rows(packing.pack(codes, bits), bits, k, group, scales=scales, zeros=zeros)
    return with_fragments(weight, torch.float16)  # as the runtime's layers hold them


def table(n: int, k: int, outliers: float = 0.0) -> KernelWeight:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    parts = {}
    if outliers:
        per_row = round(outliers * k)
        columns = torch.rand(n, k, device="cuda").argsort(dim=1)[:, :per_row].sort(dim=1).values
        parts = dict(outlier_values=torch.randn(n * per_row, device="cuda", dtype=torch.float16) * 0.1,
                     outlier_columns=columns.reshape(-1).to(torch.int32),
                     outlier_row_offsets=torch.arange(n + 1, device="cuda", dtype=torch.int32) * per_row)
    return KernelWeight.from_rows(packing.pack(codes, 4), 4, k, -1,
                                  lut=torch.randn(n, 1, 16, device="cuda", dtype=torch.float16) * 0.02, **parts)


VARIANTS = {
    "W4 g64 asym": lambda n, k: uniform(n, k, 4, 64, False),
    "W4 g128 sym": lambda n, k: uniform(n, k, 4, 128, True),
    "W8 per-channel sym": lambda n, k: uniform(n, k, 8, -1, True),
    "LUT4 per-row": lambda n, k: table(n, k),
    "LUT4 per-row + 0.45% outliers": lambda n, k: table(n, k, 0.0045),
}


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read plus write)."""
    source = torch.empty(2**30, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    seconds = triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=500, return_mode="median") / 1e3
    return 2 * source.numel() * source.element_size() / seconds


def graph_time(make_call, copies: int) -> float:
    """Median seconds of one call: a CUDA graph runs `make_call(i)()` for each copy i."""
    return graph_us([make_call(i) for i in range(copies)], rep=200, warmup=10) / 1e6


def copies_for(bytes_per_call: int) -> int:
    """Copies of a call's operands timed in one graph: as the tuner times them (three times the L2
    cache's size), and at least two."""
    return max(2, copies_to_fill_l2(bytes_per_call))


def int4pack(n: int, k: int):
    """torch's int4 kernel's inputs: packed codes (its tile layout) and bf16 scales and zeros, group 128."""
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
    scales_zeros = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
    return packed, scales_zeros


def timed(name: str, m: int) -> bool:
    """Whether the table times scheme `name` at m tokens: the main scheme at every m, the others at 1, 16, 256."""
    return name == "W4 g64 asym" or m in (1, 16, 256)


def measure_shape(k: int, n: int, tokens: list[int], bandwidth: float, variants: list[str]) -> list[dict]:
    rows = []
    dense_bytes = n * k * 2
    copies = copies_for(dense_bytes)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    int4 = None
    try:
        int4 = [int4pack(n, k) for _ in range(copies)]
    except (RuntimeError, AttributeError) as error:
        print(f"torch int4 kernel unavailable: {error}")
    built = {}
    for name in variants:
        make = VARIANTS[name]
        first = make(n, k)
        built[name] = [first] + [make(n, k) for _ in range(copies_for(first.nbytes) - 1)]
    for m in tokens:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
        fp16 = graph_time(lambda i: (lambda: F.linear(xs[i], weights[i])), copies)
        row = {"in": k, "out": n, "tokens": m, "fp16_ms": fp16 * 1e3,
               "fp16_floor_ms": (dense_bytes + 2 * m * (k + n)) / bandwidth * 1e3}
        if int4 is not None:
            xb = [x.bfloat16() for x in xs]
            row["torch_int4_ms"] = graph_time(
                lambda i: (lambda: torch.ops.aten._weight_int4pack_mm(xb[i], int4[i][0], 128, int4[i][1])), copies) * 1e3
        for name, variant in built.items():
            if not timed(name, m):
                continue
            x_copies = [xs[i % copies] for i in range(len(variant))]
            seconds = graph_time(lambda i: (lambda: quant_matmul(x_copies[i], variant[i])), len(variant))
            moved = variant[0].nbytes + 2 * m * (k + n)
            row[name] = {"ms": seconds * 1e3, "speedup": fp16 / seconds, "floor_ms": moved / bandwidth * 1e3,
                         "GB/s": moved / seconds / 1e9, "TFLOP/s": 2 * m * n * k / seconds / 1e12}
        rows.append(row)
        print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()
                          if not isinstance(v, dict)}),
              {name: round(v["speedup"], 2) for name, v in row.items() if isinstance(v, dict)}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--shapes", nargs="+", type=shape, default=SHAPES, metavar="INxOUT")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--compile-jobs", type=int, default=1,
                        help="compile every configuration first in this many processes at once")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="write one table from the JSON of earlier runs (one device call each) instead of measuring")
    args = parser.parse_args()
    if args.compile_jobs > 1 and not args.merge:
        compile_first(args.compile_jobs, args.shapes, args.tokens, args.variants)
    result = merged(args.merge) if args.merge else measured(args.shapes, args.tokens, args.variants)
    gpu = result["gpu"]
    slug = gpu.split()[-1].lower() if gpu.startswith("NVIDIA") else "gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels_{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"kernels_{slug}.md").write_text(markdown(result))
    plot(result, args.out / f"kernels_{slug}.png")
    print(markdown(result))
    for line in result["tuning"]:
        print(line)


def shape(text: str) -> tuple[int, int]:
    """A layer shape given as INxOUT (in features K, out features N), both positive."""
    try:
        k, n = (int(value) for value in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not INxOUT, e.g. 4096x14336") from None
    if k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has a size below 1")
    return k, n


def measured(shapes: list[tuple[int, int]], tokens: list[int], variants: list[str]) -> dict:
    _TUNER.persist = False  # every candidate timed here, for the notes
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    rows = []
    for k, n in shapes:
        rows += measure_shape(k, n, tokens, bandwidth, variants)
    return {
        "benchmark": "qtool quantized matmul vs fp16 F.linear and aten._weight_int4pack_mm (group 128)",
        "date": date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bandwidth / 1e9,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "method": "median replay of a CUDA graph over copies of the inputs larger than L2 (triton.testing.do_bench)",
        "rows": rows, "tuning": tuning(),
    }


def compile_first(jobs: int, shapes: list[tuple[int, int]], tokens: list[int], variants: list[str]) -> None:
    """Every (scheme, token count) the table times, tuned once in `jobs` processes at once on the
    smallest shape; their timings are thrown away, their compiled kernels stay in Triton's cache."""
    k, n = min(shapes, key=lambda kn: kn[0] * kn[1])
    work = [(name, m) for m in tokens for name in variants if timed(name, m)]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in as_completed([pool.submit(tune, name, m, k, n) for name, m in work]):
            done.result()


def tune(name: str, m: int, k: int, n: int) -> None:
    """One product of scheme `name` at m tokens, which tunes it: every candidate compiled and timed."""
    _TUNER.persist = False
    quant_matmul(torch.randn(m, k, device="cuda", dtype=torch.float16), VARIANTS[name](n, k))
    torch.cuda.synchronize()


def merged(paths: list[Path]) -> dict:
    """The rows of several runs on one GPU and software stack as one result (rows in shape order);
    the lowest copy bandwidth among them, so that no floor is flattered."""
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            refuse(f"cannot read {path} ({error}): give the kernels_<gpu>.json of earlier runs")
        missing = {"gpu", "versions", "date", "copy_bandwidth_GBps", "rows", "tuning"} - set(result)
        if missing:
            refuse(f"{path} lacks {', '.join(sorted(missing))}: give the kernels_<gpu>.json of earlier runs")
        results.append(result)
    first = results[0]
    for path, other in zip(paths, results):
        if (other["gpu"], other["versions"]) != (first["gpu"], first["versions"]):
            refuse(f"{path} was measured on {other['gpu']} with {other['versions']}, {paths[0]} on {first['gpu']} "
                   f"with {first['versions']}: merge runs of one machine")
    rows = sorted((row for result in results for row in result["rows"]), key=lambda r: (r["in"], r["out"], r["tokens"]))
    keys = [(row["in"], row["out"], row["tokens"]) for row in rows]
    if len(set(keys)) < len(keys):
        refuse(f"the runs measure {max(keys, key=keys.count)} (in, out, tokens) more than once: merge runs of "
               f"different shapes or tokens")
    return dict(first, date=max(result["date"] for result in results), rows=rows,
                copy_bandwidth_GBps=min(result["copy_bandwidth_GBps"] for result in results),
                tuning=[line for result in results for line in result["tuning"]])


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def tuning() -> list[str]:
    """The tuner's three fastest configurations per key, one line each."""
    return [f"{key}: " + "; ".join(f"{ms * 1e3:.1f}us {config}" for ms, config in timed[:3])
            for key, timed in _TUNER.timings.items()]


def markdown(result: dict) -> str:
    lines = [f"# {result['benchmark']} ({result['date']})", "",
             f"{result['gpu']}; torch {result['versions']['torch']}, triton {result['versions']['triton']}; copy "
             f"bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s. {result['method']}. Speed-up over fp16 `F.linear`.",
             "", "| in x out | M | fp16 ms | torch int4 | W4 g64 asym | W4 g128 sym | W8 ch sym | LUT4 | LUT4+0.45% |"
             " W4 g64 GB/s | W4 g64 floor ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        def cell(name):
            return f"{row[name]['speedup']:.2f}x" if name in row else ""
        int4 = f"{row['fp16_ms'] / row['torch_int4_ms']:.2f}x" if "torch_int4_ms" in row else ""
        main = row["W4 g64 asym"]
        lines.append(f"| {row['in']}x{row['out']} | {row['tokens']} | {row['fp16_ms']:.4f} | {int4} | "
                     + " | ".join(cell(name) for name in VARIANTS) + f" | {main['GB/s']:.0f} | {main['floor_ms']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for k, n in sorted({(row["in"], row["out"]) for row in result["rows"]}):
        rows = [row for row in result["rows"] if (row["in"], row["out"]) == (k, n)]
        line, = axis.plot([r["tokens"] for r in rows], [r["W4 g64 asym"]["speedup"] for r in rows], marker="o",
                          label=f"qtool W4 g64 {k}x{n}")
        if all("torch_int4_ms" in r for r in rows):
            axis.plot([r["tokens"] for r in rows], [r["fp16_ms"] / r["torch_int4_ms"] for r in rows], linestyle=":",
                      color=line.get_color(), label=f"torch int4 {k}x{n}")
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("tokens (M)")
    axis.set_ylabel("speed-up over fp16 F.linear")
    axis.set_title(f"{result['gpu']}: 4-bit matmul vs fp16")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Quality, size and time of qtool's checkpoints of SmolLM2-135M, through the CLI.

For each scheme of a set: `qtool quantize`, then `qtool eval` on the WikiText-2 test split (seqlen
2048, fp32 on the CPU), with `--compare smollm2-135m` when asked (KL and top-1 agreement; it
re-evaluates the base model for every scheme). Writes benchmarks/results/smollm2_<set>.{json,md}.

usage: python benchmarks/smollm2_quality.py rtn|gptq|awq|squeezellm [--windows 40] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION = ["--calib", "wiki-leads", "--nsamples", "128", "--seqlen", "512", "--seed", "0"]
# SqueezeLLM's Fisher information on its default 100 x 512 tokens, computed by the first row that
# needs it (its time includes it) and read from the same file by the others
SQUEEZELLM = ["--calib", "wiki-leads", "--nsamples", "100", "--seqlen", "512", "--seed", "0", "--fisher",
              "{scratch}/fisher.safetensors"]
SETS = {
    "rtn": {
        "RTN W8 per-channel sym": ["--bits", "8", "--group-size", "-1", "--sym"],
        "RTN W4 g64 asym": ["--bits", "4", "--group-size", "64", "--asym"],
        "RTN W4 g64 sym": ["--bits", "4", "--group-size", "64", "--sym"],
    },
    "gptq": {
        "GPTQ W4 g64 asym, mse grid": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym", "--mse",
                                       *CALIBRATION],
        "GPTQ W4 g64 sym": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", *CALIBRATION],
        "GPTQ W3 g64 asym, mse grid": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--asym", "--mse",
                                       *CALIBRATION],
    },
    "awq": {
        "AWQ W4 g64 asym": ["--method", "awq", "--bits", "4", "--group-size", "64", "--asym", *CALIBRATION],
        "AWQ+GPTQ W4 g64 asym": ["--method", "awq+gptq", "--bits", "4", "--group-size", "64", "--asym", *CALIBRATION],
        "AWQ+GPTQ W4 g64 asym, mse grid": ["--method", "awq+gptq", "--bits", "4", "--group-size", "64", "--asym",
                                           "--mse", *CALIBRATION],
    },
    "squeezellm": {
        "RTN W4 per-channel asym": ["--bits", "4", "--group-size", "-1", "--asym"],
        "SqueezeLLM W4 per-row LUT": ["--method", "squeezellm", "--bits", "4", *SQUEEZELLM],
        "SqueezeLLM W4 per-row LUT, no Fisher weights": ["--method", "squeezellm", "--bits", "4", "--no-sensitivity",
                                                          *SQUEEZELLM],
        "SqueezeLLM W4 per-row LUT, 0.45% outliers": ["--method", "squeezellm", "--bits", "4", "--outliers", "0.45%",
                                                      *SQUEEZELLM],
        "SqueezeLLM W3 per-row LUT": ["--method", "squeezellm", "--bits", "3", *SQUEEZELLM],
        "SqueezeLLM W3 per-row LUT, 0.45% outliers": ["--method", "squeezellm", "--bits", "3", "--outliers", "0.45%",
                                                      *SQUEEZELLM],
    },
}


def qtool(*args: str) -> tuple[dict, str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qtool.cli.app", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"qtool {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout), "qtool " + " ".join(args), time.perf_counter() - started


def measure(name: str, flags: list[str], scratch: str, windows: str, compare: bool) -> dict:
    out = str(Path(scratch) / name.replace(" ", "_"))
    flags = [flag.format(scratch=scratch) for flag in flags]
    quantized, quantize_command, quantize_wall = qtool("quantize", "smollm2-135m", "-o", out, *flags)
    eval_flags = ["--ppl", "wikitext", "--seqlen", "2048", "--max-windows", windows]
    evaluated, eval_command, _ = qtool("eval", out, *eval_flags, *(["--compare", "smollm2-135m"] if compare else []))
    row = {
        "scheme": name,
        "quantize_command": quantize_command.replace(out, "OUT").replace(scratch, "SCRATCH"),
        "eval_command": eval_command.replace(out, "OUT"),
        "quantize_wall_seconds": round(quantize_wall, 1),
        "size_before_bytes": quantized["size_before_bytes"],
        "size_after_bytes": quantized["size_after_bytes"],
        "size_ratio": quantized["size_ratio"],
        "quantized_bits_per_weight": quantized["quantized_bits_per_weight"],
        "eval_seconds": round(evaluated["seconds"], 1),
    }
    row.update({key: evaluated[key] for key in ("ppl", "base_ppl", "kl", "top1_agree", "windows", "seqlen") if key in evaluated})
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    windows = str(args.windows)
    with tempfile.TemporaryDirectory() as scratch:
        rows = [measure(name, flags, scratch, windows, args.compare) for name, flags in SETS[args.set].items()]
    if not args.compare:
        base, base_command, _ = qtool("eval", "smollm2-135m", "--ppl", "wikitext", "--seqlen", "2048", "--max-windows", windows)
        for row in rows:
            row["base_ppl"] = base["ppl"]
    for row in rows:
        row["ppl_increase_pct"] = 100 * (row["ppl"] / row["base_ppl"] - 1)
    result = {
        "benchmark": f"{args.set} on SmolLM2-135M-Instruct (fp16, dequantized from its Q4_1 GGUF)",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU",
        "versions": {name: metadata.version(name) for name in ("qtool", "torch", "transformers")},
        "protocol": f"WikiText-2 raw test, GPTQ protocol, seqlen 2048, {windows} windows, fp32 on the CPU",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"smollm2_{args.set}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"smollm2_{args.set}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    versions = result["versions"]
    compared = "kl" in result["rows"][0]
    lines = [
        f"# {result['benchmark']} ({result['date']})",
        "",
        f"{result['machine']}; qtool {versions['qtool']}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}. {result['protocol']}. SmolLM2's weights were stored as Q4_1, so the fp16 "
        "baseline is that model dequantized and re-quantizing it still loses quality.",
        "",
        "| scheme | ppl | fp16 ppl | change |" + (" KL (nats/token) | top-1 agree |" if compared else "")
        + " size | vs fp16 | bits/weight | quantize time |",
        "|---|---|---|---|" + ("---|---|" if compared else "") + "---|---|---|---|",
    ]
    for row in result["rows"]:
        extra = f" {row['kl']:.4f} | {row['top1_agree']:.2%} |" if compared else ""
        lines.append(
            f"| {row['scheme']} | {row['ppl']:.3f} | {row['base_ppl']:.3f} | {row['ppl_increase_pct']:+.2f}% |{extra} "
            f"{row['size_after_bytes'] / 2**20:.1f} MiB | {row['size_ratio']:.1%} | "
            f"{row['quantized_bits_per_weight']:.3f} | {row['quantize_wall_seconds']:.1f} s |"
        )
    lines += ["", "Commands (OUT is a scratch folder):", ""]
    lines += [f"- `{row['quantize_command']}` then `{row['eval_command']}`" for row in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

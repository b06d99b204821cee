"""RTN on SmolLM2-135M: quality, size and time of the foundation's checkpoints, through the CLI.

Runs `qtool quantize` and `qtool eval --compare` (WikiText-2 test, seqlen 2048, 40 windows, fp32
on the CPU) for each scheme, and writes benchmarks/results/foundation_rtn_smollm2.{json,md}.
usage: python benchmarks/foundation_rtn.py [--windows 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = {
    "RTN W8 per-channel sym": ["--bits", "8", "--group-size", "-1", "--sym"],
    "RTN W4 g64 asym": ["--bits", "4", "--group-size", "64", "--asym"],
    "RTN W4 g64 sym": ["--bits", "4", "--group-size", "64", "--sym"],
}


def qtool(*args: str) -> tuple[dict, list[str], float]:
    command = [sys.executable, "-m", "qtool.cli.app", *args, "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout), ["qtool", *args], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=40)
    windows = str(parser.parse_args().windows)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in SCHEMES.items():
            out = str(Path(scratch) / name.replace(" ", "_"))
            quantized, quantize_command, quantize_wall = qtool("quantize", "smollm2-135m", "-o", out, *flags)
            evaluated, eval_command, _ = qtool(
                "eval", out, "--ppl", "wikitext", "--seqlen", "2048", "--max-windows", windows, "--compare", "smollm2-135m"
            )
            rows.append({
                "scheme": name,
                "quantize_command": " ".join(quantize_command).replace(out, "OUT"),
                "eval_command": " ".join(eval_command).replace(out, "OUT"),
                "quantize_wall_seconds": round(quantize_wall, 1),
                "quantize_seconds_reported": quantized["seconds"],
                "size_before_bytes": quantized["size_before_bytes"],
                "size_after_bytes": quantized["size_after_bytes"],
                "size_ratio": quantized["size_ratio"],
                "quantized_bits_per_weight": quantized["quantized_bits_per_weight"],
                **{key: evaluated[key] for key in ("ppl", "base_ppl", "kl", "top1_agree", "windows", "tokens", "seqlen")},
                "ppl_increase_pct": 100 * (evaluated["ppl"] / evaluated["base_ppl"] - 1),
                "eval_seconds": round(evaluated["seconds"], 1),
            })
    result = {
        "benchmark": "foundation RTN on SmolLM2-135M-Instruct (fp16 dequantized from its Q4_1 GGUF)",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores, no GPU",
        "versions": {name: metadata.version(name) for name in ("qtool", "torch", "transformers")},
        "protocol": "WikiText-2 raw test, GPTQ protocol, seqlen 2048, fp32 on the CPU",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "foundation_rtn_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# RTN on SmolLM2-135M ({result['date']})",
        "",
        f"{result['machine']}; qtool {result['versions']['qtool']}, torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}. {result['protocol']}, {windows} windows. "
        "SmolLM2's weights were stored as Q4_1, so the fp16 baseline is that model dequantized.",
        "",
        "| scheme | ppl | fp16 ppl | change | KL (nats/token) | top-1 agree | size | vs fp16 | bits/weight | quantize time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scheme']} | {row['ppl']:.3f} | {row['base_ppl']:.3f} | {row['ppl_increase_pct']:+.2f}% | "
            f"{row['kl']:.4f} | {row['top1_agree']:.2%} | {row['size_after_bytes'] / 2**20:.1f} MiB | "
            f"{row['size_ratio']:.1%} | {row['quantized_bits_per_weight']:.3f} | {row['quantize_wall_seconds']:.1f} s |"
        )
    lines += ["", "Commands (OUT is a scratch folder):", ""]
    lines += [f"- `{row['quantize_command']}` then `{row['eval_command']}`" for row in rows]
    (RESULTS / "foundation_rtn_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Peak device memory of `qtool quantize` on a GPU for a model larger than the memory it is allowed.

Builds the random-weight Llama-3-8B-shaped model with 8 blocks of `host_memory.py` (about 5.6 GB
on disk), then quantizes it with GPTQ on CUDA under `--max-device-memory` set below the model's
size, activations offloaded to the CPU, and records the peak CUDA memory qtool reports.
Writes benchmarks/results/device_memory_<device>.{json,md}.

usage: python benchmarks/device_memory.py [--model-dir DIR] [--cap 4.5GiB] [--results DIR] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_memory import build_model  # noqa: E402

FLAGS = ["--method", "gptq", "--nsamples", "128", "--seqlen", "512", "--offload-activations"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "qtool-llama3-8b-shaped-8-blocks")
    parser.add_argument("--cap", default="4.5GiB")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer files (default: SmolLM2's)")
    args = parser.parse_args()
    build_model(args.model_dir, args.tokenizer)
    flags = [*FLAGS, "--max-device-memory", args.cap]
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "qtool.cli.app", "quantize", str(args.model_dir), "-o", f"{scratch}/out",
                   "--device", "cuda", "--json", *flags]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout)
    device = torch.cuda.get_device_name()
    result = {
        "benchmark": "peak CUDA memory of qtool quantize (GPTQ) on a Llama-3-8B-shaped model with 8 blocks, "
                     "random fp16 weights, under a device memory cap below the model's size",
        "date": date.today().isoformat(),
        "device": device,
        "versions": {name: metadata.version(name) for name in ("qtool", "torch", "transformers")},
        "command": "qtool quantize MODEL -o OUT --device cuda " + " ".join(flags),
        "model_bytes": summary["size_before_bytes"],
        "cap": args.cap,
        "peak_device_memory_bytes": summary["peak_device_memory_bytes"],
        "peak_host_memory_bytes": summary["peak_host_memory_bytes"],
        "seconds": summary["seconds"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "device_memory_" + next((word for word in device.split() if any(c.isdigit() for c in word)), "gpu").lower()
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    v = result["versions"]
    return "\n".join([
        f"# {result['benchmark']} ({result['date']})",
        "",
        f"{result['device']}; qtool {v['qtool']}, torch {v['torch']}, transformers {v['transformers']}.",
        "",
        "| model on disk | --max-device-memory | peak device memory | peak host memory | time |",
        "|---|---|---|---|---|",
        f"| {result['model_bytes'] / 2**30:.2f} GiB | {result['cap']} | {result['peak_device_memory_bytes'] / 2**30:.2f} GiB "
        f"| {result['peak_host_memory_bytes'] / 2**30:.2f} GiB | {result['seconds']:.0f} s |",
        "",
        f"Command (MODEL built by the script, OUT a scratch folder): `{result['command']}`",
    ]) + "\n"


if __name__ == "__main__":
    main()

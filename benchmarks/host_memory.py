"""Peak host memory (RSS) of `qtool quantize` on the CPU for a model larger than what it keeps.

Builds (once) a random-weight model with Llama-3-8B's layer shapes but 8 decoder blocks, fp16,
untied head (about 5.6 GB on disk), written tensor by tensor so building it needs little memory
too; then quantizes it with RTN and with GPTQ (32 x 512 calibration tokens) under
`/usr/bin/time -v` and records the maximum resident set size of each run.
Writes benchmarks/results/host_memory.{json,md}.

usage: python benchmarks/host_memory.py [--model-dir DIR] [--methods rtn gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from qtool.quantize.format.checkpoint import PendingTensor, save_tensors, write_json
from qtool.runtime.resolve import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "blocks": 8, "vocab": 128256}
METHOD_FLAGS = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq", "--nsamples", "32", "--seqlen", "512"],
}


def random_tensor(name: str, shape: tuple[int, ...]) -> PendingTensor:
    """Seeded N(0, 0.02) weights (ones for norms), made only when the writer gets to them."""
    seed = sum(name.encode())

    def make() -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.float16)
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=generator) * 0.02).half()

    return PendingTensor(torch.float16, shape, make)


def build_model(folder: Path, tokenizer: Path | None = None) -> None:
    """Write the model to `folder` (once), with the tokenizer files of `tokenizer` (default:
    SmolLM2's, whose ids all fit the vocabulary)."""
    if (folder / "config.json").is_file():
        return
    h, i, heads, kv = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["heads"], SHAPE["kv_heads"]
    head_dim = h // heads
    tensors = {"model.embed_tokens.weight": (SHAPE["vocab"], h), "lm_head.weight": (SHAPE["vocab"], h),
               "model.norm.weight": (h,)}
    for b in range(SHAPE["blocks"]):
        p = f"model.layers.{b}."
        tensors.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv * head_dim, h),
            p + "self_attn.v_proj.weight": (kv * head_dim, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    save_tensors(scratch, {name: random_tensor(name, shape) for name, shape in tensors.items()})
    write_json(scratch / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
        "num_attention_heads": heads, "num_key_value_heads": kv, "num_hidden_layers": SHAPE["blocks"],
        "vocab_size": SHAPE["vocab"], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu",
    })
    for file in (tokenizer or resolve_model("smollm2-135m")).glob("tokenizer*"):
        shutil.copy(file, scratch / file.name)
    scratch.rename(folder)


def measure(model: Path, method: str, scratch: Path) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "qtool.cli.app", "quantize", str(model),
               "-o", str(scratch / method), "--device", "cpu", "--json", *METHOD_FLAGS[method]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    summary = json.loads(done.stdout)
    return {
        "method": method,
        "command": "/usr/bin/time -v qtool quantize MODEL -o OUT --device cpu " + " ".join(METHOD_FLAGS[method]),
        "peak_rss_bytes": peak_kib * 1024,
        "seconds": summary["seconds"],
        "size_before_bytes": summary["size_before_bytes"],
        "size_after_bytes": summary["size_after_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "qtool-llama3-8b-shaped-8-blocks")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_FLAGS), choices=list(METHOD_FLAGS))
    args = parser.parse_args()
    build_model(args.model_dir)
    with tempfile.TemporaryDirectory(dir=args.model_dir.parent) as scratch:
        rows = [measure(args.model_dir, method, Path(scratch)) for method in args.methods]
    result = {
        "benchmark": "peak host memory of qtool quantize on a Llama-3-8B-shaped model with 8 blocks (random fp16 weights)",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
        "versions": {name: metadata.version(name) for name in ("qtool", "torch", "transformers")},
        "model_shape": SHAPE,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "host_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "host_memory.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [
        f"# {result['benchmark']} ({result['date']})",
        "",
        f"{result['machine']}; qtool {v['qtool']}, torch {v['torch']}, transformers {v['transformers']}.",
        "",
        "| method | model on disk | checkpoint | peak RSS | time |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['method']} | {row['size_before_bytes'] / 1e9:.2f} GB | {row['size_after_bytes'] / 1e9:.2f} GB "
                     f"| {row['peak_rss_bytes'] / 1e9:.2f} GB | {row['seconds']:.0f} s |")
    lines += ["", "Commands (MODEL is the folder the script builds, OUT a scratch folder):", ""]
    lines += [f"- `{row['command']}`" for row in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

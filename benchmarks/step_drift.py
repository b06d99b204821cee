"""Whether a process's batch-1 decode step stays as fast as it started. The GPU time of the batch-1
decode graph (100 replays back to back) on a fresh engine, after a load of each `--after` size on
that engine, and on an engine built after those. On the device tool's H200 it did not: the same
graph replayed 1.89 ms fresh and 2.01 ms after a load of 32 or 64 requests, the kernels' own times
unchanged (runtime_h200.md, "One process's batch-1 step moves by 6%"); what moves it is not known.
Loads of 32 requests and more are the first whose prompts take more than one prefill chunk
(`--max-batched-tokens`), and the engine's KV cache fills most of the GPU (`--kv-cache-gib` sizes it):
the two knobs to bisect with.

usage: python benchmarks/step_drift.py [--synthetic llama3-8b] [--after 16 32 64] [--kv-cache-gib G]
       [--max-batched-tokens T] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from decode_ab import replay_ms
from qtool.errors import QtoolError
from qtool.runtime.bench import run_load, synthetic_config, synthetic_model
from qtool.runtime.engine import Engine

PROMPT, OUTPUT = 128, 256


def batch1_step(engine: Engine) -> tuple[float, float]:
    """(decode tokens/s of a batch-1 load, GPU ms of a replay of its decode graph)."""
    rate = run_load(engine, 1, PROMPT, OUTPUT, seed=5).decode_tokens_per_s
    return rate, replay_ms(engine.graphs.graphs[engine.graphs.size_for(1)][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="llama3-8b")
    parser.add_argument("--after", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--kv-cache-gib", type=float, help="the KV cache's size (default: most of the GPU)")
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--json")
    args = parser.parse_args()
    try:
        config = synthetic_config(args.synthetic)
        if min(args.after) < 1:
            raise QtoolError("--after takes request counts of at least 1")
        if args.kv_cache_gib is not None and args.kv_cache_gib <= 0:
            raise QtoolError("--kv-cache-gib must be positive")
        if args.max_batched_tokens < PROMPT:
            raise QtoolError(f"--max-batched-tokens must be at least the prompts' {PROMPT} tokens")
        if not torch.cuda.is_available():
            raise QtoolError("this benchmark replays CUDA-graph decode steps: run it on a CUDA GPU")
    except QtoolError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2)
    model = synthetic_model(config, 4, 64, torch.float16, "cuda")
    options = dict(max_sequences=max(args.after), max_batched_tokens=args.max_batched_tokens,
                   cache_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * (1 << 30)))
    engine = Engine(model, None, "cuda", torch.float16, **options)
    run_load(engine, 1, PROMPT, OUTPUT, seed=1)  # compiles, tunes, captures
    steps = {"fresh": batch1_step(engine)}
    for requests in args.after:
        run_load(engine, requests, PROMPT, OUTPUT, seed=1)
        steps[f"after {requests} requests"] = batch1_step(engine)
    del engine
    torch.cuda.empty_cache()
    engine = Engine(model, None, "cuda", torch.float16, **options)
    run_load(engine, 1, PROMPT, OUTPUT, seed=1)
    steps["engine built again"] = batch1_step(engine)
    for label, (rate, ms) in steps.items():
        print(f"{label}: batch-1 decode {rate:.1f} tok/s, GPU step {ms:.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(script="benchmarks/step_drift.py",
                           arguments={key: value for key, value in vars(args).items() if key != "json"},
                           device=torch.cuda.get_device_name(), torch=torch.__version__,
                           steps={label: dict(decode_tokens_per_s=rate, gpu_step_ms=ms)
                                  for label, (rate, ms) in steps.items()}), file, indent=1)


if __name__ == "__main__":
    main()

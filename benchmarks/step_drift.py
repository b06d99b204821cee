"""Whether a process's batch-1 decode step stays as fast as it started. The GPU time of the batch-1
decode graph (100 replays back to back) on a fresh engine, after each load of `--after` on that
engine, and on an engine built after those. On the device tool's H200 it did not: the same graph
replayed 1.89 ms fresh and 2.01 ms after a load of 32 or 64 requests of 128 + 256 tokens, the
kernels' own times unchanged, and a process that tuned the kernels itself was slow from its first
engine (runtime_h200.md, "One process's batch-1 step moves by 6%"). A load is REQUESTSxPROMPTxOUTPUT
(a bare count: prompts of 128 tokens, 256 output tokens); `--kv-cache-gib` sizes the KV cache and
`--max-batched-tokens` the prefill chunks, the other knobs to bisect with.

usage: python benchmarks/step_drift.py [--synthetic llama3-8b] [--after 16 32 64x2x400 ...] [--kv-cache-gib G]
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


def load_shape(text: str) -> tuple[int, int, int]:
    """REQUESTSxPROMPTxOUTPUT, or a bare request count (prompts of PROMPT tokens, OUTPUT tokens)."""
    parts = text.split("x")
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, 3) or min(sizes) < 1:
        raise QtoolError(f"--after: {text!r} is not a request count or REQUESTSxPROMPTxOUTPUT of counts of at "
                         f"least 1, e.g. 64 or 64x2x400")
    return sizes if len(sizes) == 3 else (sizes[0], PROMPT, OUTPUT)


def batch1_step(engine: Engine) -> tuple[float, float]:
    """(decode tokens/s of a batch-1 load, GPU ms of a replay of its decode graph)."""
    rate = run_load(engine, 1, PROMPT, OUTPUT, seed=5).decode_tokens_per_s
    return rate, replay_ms(engine.graphs.graphs[engine.graphs.size_for(1)][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="llama3-8b")
    parser.add_argument("--after", nargs="+", default=["16", "32", "64"], metavar="LOAD")
    parser.add_argument("--kv-cache-gib", type=float, help="the KV cache's size (default: most of the GPU)")
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--json")
    args = parser.parse_args()
    try:
        config = synthetic_config(args.synthetic)
        args.after = [load_shape(text) for text in args.after]
        if args.kv_cache_gib is not None and args.kv_cache_gib <= 0:
            raise QtoolError("--kv-cache-gib must be positive")
        if len(set(args.after)) < len(args.after):
            raise QtoolError("--after names a load twice; give each load once")
        if max(prompt + output for _, prompt, output in args.after) > config.max_position_embeddings:
            raise QtoolError(f"--after: a request of more than the model's {config.max_position_embeddings} "
                             f"positions (prompt + output)")
        longest = max(prompt for _, prompt, _ in args.after)
        if args.max_batched_tokens < max(longest, PROMPT):
            raise QtoolError(f"--max-batched-tokens must be at least the prompts' {max(longest, PROMPT)} tokens")
        if not torch.cuda.is_available():
            raise QtoolError("this benchmark replays CUDA-graph decode steps: run it on a CUDA GPU")
        steps = measured(config, args)
    except QtoolError as error:  # bad input, or a load the engine refuses (a KV cache too small for it)
        print(error, file=sys.stderr)
        raise SystemExit(2)
    for label, (rate, ms) in steps.items():
        print(f"{label}: batch-1 decode {rate:.1f} tok/s, GPU step {ms:.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(script="benchmarks/step_drift.py",
                           arguments={key: value for key, value in vars(args).items() if key != "json"},
                           device=torch.cuda.get_device_name(), torch=torch.__version__,
                           steps={label: dict(decode_tokens_per_s=rate, gpu_step_ms=ms)
                                  for label, (rate, ms) in steps.items()}), file, indent=1)


def measured(config, args) -> dict[str, tuple[float, float]]:
    """(decode tok/s, GPU step ms) of the batch-1 load fresh, after each load, on a new engine."""
    model = synthetic_model(config, 4, 64, torch.float16, "cuda")
    cache_bytes = None if args.kv_cache_gib is None else int(args.kv_cache_gib * (1 << 30))
    options = dict(max_sequences=max(requests for requests, _, _ in args.after),
                   max_batched_tokens=args.max_batched_tokens, cache_bytes=cache_bytes)
    engine = Engine(model, None, "cuda", torch.float16, **options)
    run_load(engine, 1, PROMPT, OUTPUT, seed=1)  # compiles, tunes, captures
    steps = {"fresh": batch1_step(engine)}
    for requests, prompt, output in args.after:
        run_load(engine, requests, prompt, output, seed=1)
        steps[f"after {requests} requests of {prompt} + {output} tokens"] = batch1_step(engine)
    del engine
    torch.cuda.empty_cache()
    engine = Engine(model, None, "cuda", torch.float16, **options)
    run_load(engine, 1, PROMPT, OUTPUT, seed=1)
    steps["engine built again"] = batch1_step(engine)
    return steps


if __name__ == "__main__":
    main()

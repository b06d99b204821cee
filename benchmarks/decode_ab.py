"""Decode speed with one of the runtime's decode-step features on and off, on one machine in one
process, the two modes alternated: machines of one kind differ by more than such a change
(batch-1 decode 345-416 tokens/s on the device tool's H200s). `--feature`:
- pending: few-token products left pending for their readers (qtool.kernels.pending), against
  products the kernel finishes itself (an arrival count; the last program of a tile writes y);
- run-ahead: the engine launching the next decode step before it reads the last one's tokens
  (qtool.runtime.engine), against a step at a time;
- pdl: the kernels launched as programmatic dependents of the kernel before them
  (qtool.kernels.dependent_launch), against launched once it has ended.

Batch sizes are taken in ascending order, each through every round and mode before the next: once
a process has run a 64-request load, its batch-1 steps stay about 6% slower, in either mode
(runtime_h200.md, "Kernels launched as programmatic dependents"), so a larger batch measured first
would favour the mode that ran before it. Each round builds an engine (CUDA graphs captured in its
mode), warms it with one load and runs the load `--repeats` times; decode tokens/s per run and the
median per mode and batch size. Decode
tokens/s counts the host's part of a step too, which varies from run to run; so each round also
times the GPU alone: 100 back-to-back replays of the batch size's captured decode graph, timed
by CUDA events (ms a step).

usage: python benchmarks/decode_ab.py [--feature pending|run-ahead|pdl] [--synthetic llama3-8b]
       [--batch-sizes 1 8 64] [--prompt-len 128] [--output-len 256] [--rounds 2] [--repeats 3]
       [--json OUT.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
from datetime import date

import torch
import triton

from qtool.errors import QtoolError
from qtool.kernels import dependent_launch
from qtool.runtime import quant_linear
from qtool.runtime.bench import run_load, synthetic_config, synthetic_model
from qtool.runtime.engine import Engine
from qtool.runtime.scheduler import Scheduler

ENABLED = {"pending": (quant_linear, "pends"), "run-ahead": (Scheduler, "extend"),
           "pdl": (dependent_launch, "overlaps")}
DISABLED = {"pending": lambda tokens: False, "run-ahead": lambda scheduler, step: None, "pdl": lambda device: False}


def switch(feature: str, on: bool, original) -> None:
    """Turns the feature on (its own function back) or off (a stand-in that declines every time)."""
    owner, name = ENABLED[feature]
    setattr(owner, name, original if on else DISABLED[feature])


def decode_rates(model, batch: int, max_sequences: int, prompt_len: int, output_len: int,
                 repeats: int) -> tuple[list[float], float]:
    """The decode tokens/s of each run and the GPU ms of a decode step, of `batch` requests on an
    engine built for `max_sequences`."""
    engine = Engine(model, None, "cuda", torch.float16, max_sequences=max_sequences)
    run_load(engine, batch, prompt_len, output_len, seed=1)  # compiles, tunes, captures
    rates = [run_load(engine, batch, prompt_len, output_len, seed=2 + run).decode_tokens_per_s for run in range(repeats)]
    step_ms = replay_ms(engine.graphs.graphs[engine.graphs.size_for(batch)][0])
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return rates, step_ms


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 100) -> float:
    """GPU time of one replay of a decode step's graph, replayed back to back (its last inputs: the
    load is over, so the slots it writes belong to no sequence)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def checked(args: argparse.Namespace):
    """The synthetic model's config, once the arguments are sound; bad input: one line on stderr,
    exit status 2, before any model is built."""
    counts = dict(batch_sizes=min(args.batch_sizes), prompt_len=args.prompt_len, output_len=args.output_len,
                  rounds=args.rounds, repeats=args.repeats)
    low = [name for name, value in counts.items() if value < 1]
    try:
        if low:
            raise QtoolError(f"--{low[0].replace('_', '-')} must be at least 1")
        if args.output_len < 2:
            raise QtoolError("--output-len must be at least 2: a load needs decode steps to time")
        config = synthetic_config(args.synthetic)
        if not torch.cuda.is_available():
            raise QtoolError("this benchmark times CUDA-graph decode steps: run it on a CUDA GPU")
    except QtoolError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feature", choices=sorted(ENABLED), default="pending")
    parser.add_argument("--synthetic", default="llama3-8b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = checked(args)
    model = synthetic_model(config, 4, 64, torch.float16, "cuda")
    modes = ("on", "off")
    original = getattr(*ENABLED[args.feature])
    runs = {mode: {batch: [] for batch in args.batch_sizes} for mode in modes}
    steps = {mode: {batch: [] for batch in args.batch_sizes} for mode in modes}
    for batch in sorted(args.batch_sizes):
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                switch(args.feature, mode == "on", original)
                rates, step_ms = decode_rates(model, batch, max(args.batch_sizes), args.prompt_len, args.output_len,
                                              args.repeats)
                runs[mode][batch] += rates
                steps[mode][batch].append(step_ms)
                print(f"round {round_} {args.feature} {mode:3s} batch {batch:3d}: decode tok/s "
                      + " ".join(f"{rate:.1f}" for rate in rates) + f"; GPU step {step_ms:.3f} ms", flush=True)
    medians = {mode: {batch: statistics.median(rates) for batch, rates in by_batch.items()}
               for mode, by_batch in runs.items()}
    step_medians = {mode: {batch: statistics.median(ms) for batch, ms in by_batch.items()}
                    for mode, by_batch in steps.items()}
    for batch in args.batch_sizes:
        on, off = medians["on"][batch], medians["off"][batch]
        print(f"batch {batch}: decode tok/s {args.feature} on {on:.1f} off {off:.1f} ({on / off:.3f}x); "
              f"GPU step ms on {step_medians['on'][batch]:.3f} off {step_medians['off'][batch]:.3f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(command="python benchmarks/decode_ab.py " + " ".join(
                f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
                for key, value in vars(args).items() if key != "json"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=date.today().isoformat(), model=f"{args.synthetic} W4 g64",
                decode_tokens_per_s=runs, median=medians, gpu_step_ms=steps, gpu_step_ms_median=step_medians),
                file, indent=1)


if __name__ == "__main__":
    main()

"""Which token counts a sequence of loads gives the engine's linears, and which of them fall in tuner
buckets (`quant_matmul.m_bucket`) that no earlier load met: those are the products a process that
read its tuning from disk times afresh (the tuner runs on first use of a bucket). Runs the engine on
the CPU on a one-layer Llama of the same scheduling (the counts depend on the scheduler and the
prefix cache, not on the model's size). Used for the batch-1 drift (runtime_h200.md, "One
process's batch-1 step moves by 6%"): a second load with the same prompts hits the prefix cache and
prefills 32 x 16 tokens at once, a bucket of 512 that the loads of `qtool bench` never meet.

usage: python benchmarks/load_buckets.py [--loads 1x128x256x5 32x128x64x1 32x128x256x1 ...]
       (REQUESTSxPROMPTxOUTPUTxSEED each; defaults: step_drift.py's sequence)
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig

from qtool.kernels.quant_matmul import m_bucket
from qtool.runtime.bench import run_load, synthetic_model
from qtool.runtime.engine import Engine
from qtool.runtime.quant_linear import QuantLinear

TINY = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


def load(text: str) -> tuple[int, int, int, int]:
    """REQUESTSxPROMPTxOUTPUTxSEED: counts of at least 1, and a seed."""
    try:
        requests, prompt, output, seed = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not REQUESTSxPROMPTxOUTPUTxSEED, e.g. 32x128x256x1") from None
    if min(requests, prompt, output) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has a count below 1")
    return requests, prompt, output, seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", nargs="+", type=load, metavar="LOAD",
                        default=[(1, 128, 256, 5), (32, 128, 64, 1), (32, 128, 256, 1)])
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    args = parser.parse_args()
    loads = args.loads
    if args.max_batched_tokens < max(prompt for _, prompt, _, _ in loads):
        parser.error("--max-batched-tokens must be at least the longest prompt")
    model = synthetic_model(TINY, 4, 64, torch.float32, "cpu")
    counts: set[int] = set()
    next(module for module in model.modules() if isinstance(module, QuantLinear)).register_forward_pre_hook(
        lambda module, inputs: counts.add(inputs[0].numel() // inputs[0].shape[-1]))
    engine = Engine(model, None, "cpu", torch.float32, max_sequences=max(load[0] for load in loads),
                    max_batched_tokens=args.max_batched_tokens, cache_bytes=64 << 20)
    met: set[int] = set()
    for requests, prompt, output, seed in loads:
        counts.clear()
        run_load(engine, requests, prompt, output, seed=seed)
        buckets = {m_bucket(count) for count in counts}
        print(f"{requests}x{prompt}x{output} seed {seed}: token counts {sorted(counts)}, "
              f"new buckets {sorted(buckets - met)}")
        met |= buckets


if __name__ == "__main__":
    main()

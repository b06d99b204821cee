"""A calibrated method on Llama-3-8B-shaped decoder blocks on a GPU: time per block and peak
device memory.

Random fp16 weights (hidden 4096, intermediate 14336, 32 heads / 8 KV heads), random calibration
tokens (default 128 x 2048), W4 (default group 128 symmetric), through qtool.quantize.apply (the
calibration forward passes included). Writes JSON to the path given (default: stdout only).

usage: python benchmarks/block_gpu.py [--method gptq|awq|awq+gptq] [--blocks 2] [--samples 128]
       [--seqlen 2048] [--group-size 128] [--asym] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.quantize.apply import quantize_model
    from qtool.quantize.scheme import Recipe, Scheme

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.blocks, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192, rope_theta=500000.0,
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half()
    model.to("cpu")
    build_seconds = time.perf_counter() - started
    samples = torch.randint(0, config.vocab_size, (args.samples, args.seqlen))
    recipe = Recipe(method=args.method, scheme=Scheme(4, args.group_size, not args.asym))
    block_starts: list[float] = []

    def on_block(index, count):
        torch.cuda.synchronize()
        block_starts.append(time.perf_counter())

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = quantize_model(model, recipe, samples, "cuda", scale_dtype=torch.float16, on_block=on_block,
                            batch_size=args.batch_size, offload_activations=False)
    torch.cuda.synchronize()
    finished = time.perf_counter()
    total = finished - started
    block_times = [b - a for a, b in zip(block_starts, block_starts[1:] + [finished])]
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "blocks": args.blocks,
        "calibration_tokens": f"{args.samples} x {args.seqlen}",
        "method": args.method,
        "scheme": f"W4 g{args.group_size} {'asym' if args.asym else 'sym'} (GPTQ: block 128, damp 0.01, true-sequential)",
        "seconds_total": round(total, 2),
        "seconds_capturing_inputs": round(block_starts[0] - started, 2),
        "seconds_per_block": [round(t, 2) for t in block_times],
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mean_layer_error": sum(e["error"] for e in result.errors.values()) / len(result.errors),
        "model_build_seconds": round(build_seconds, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as stream:
            stream.write(text + "\n")


if __name__ == "__main__":
    main()

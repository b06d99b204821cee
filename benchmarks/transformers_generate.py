"""The baseline of issue 7's throughput target: transformers' `generate` on the fp16 model, a batch
of requests at once, on a random-weight model of an HF config (Llama-3-8B by default), the load
`qtool bench` runs (random prompt ids, greedy, every request `--output-len` tokens, no early stop).
Output tokens/s = batch x output tokens / wall time of the whole `generate` call (prefill included),
as `qtool bench` counts its output_tokens_per_s. One warm-up call first (kernels, allocator).

usage: python benchmarks/transformers_generate.py [--synthetic llama3-8b] [--batch-size 64]
       [--prompt-len 128] [--output-len 256] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch
import transformers

from qtool.runtime.bench import synthetic_config


def random_model(spec: str) -> torch.nn.Module:
    """transformers' model of the config in fp16 on the GPU, weights drawn as qtool's synthetic
    models draw theirs (normal, std 0.02)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(synthetic_config(spec), torch_dtype=torch.float16)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
    return model.eval()


def generate_seconds(model, batch: int, prompt_len: int, output_len: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator).cuda()
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=output_len,
                         min_new_tokens=output_len, pad_token_id=0)
    torch.cuda.synchronize()
    assert out.shape == (batch, prompt_len + output_len)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="llama3-8b")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    model = random_model(args.synthetic)
    generate_seconds(model, args.batch_size, args.prompt_len, 8, seed=1)  # warm-up on other prompts
    seconds = generate_seconds(model, args.batch_size, args.prompt_len, args.output_len, seed=0)
    result = dict(
        model=f"synthetic {args.synthetic} float16", batch_size=args.batch_size, prompt_len=args.prompt_len,
        output_len=args.output_len, seconds=seconds, output_tokens_per_s=args.batch_size * args.output_len / seconds,
        peak_memory_bytes=torch.cuda.max_memory_allocated(), device=torch.cuda.get_device_name(),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        date=date.today().isoformat(), attention=model.config._attn_implementation)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()

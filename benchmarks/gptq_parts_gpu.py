"""Where GPTQ's time goes on a GPU, part by part, for Llama-3-8B shapes: the solver per layer
shape, the Hessian accumulation (float32 and TF32), and one block forward over 128 x 2048 tokens."""

from __future__ import annotations

import json
import sys
import time

import torch


def timed(fn, repeat=3):
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeat


def main() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from qtool.quantize.gptq import gptq
    from qtool.quantize.scheme import Scheme

    report = {"device": torch.cuda.get_device_name()}
    tokens = 128 * 2048
    for out_f, in_f in ((4096, 4096), (14336, 4096), (4096, 14336)):
        x = torch.randn(8 * 2048, in_f, device="cuda", dtype=torch.float16)
        hessian = (2 * x.float().T @ x.float() / x.shape[0])
        weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        report[f"solver_{out_f}x{in_f}_s"] = round(timed(lambda: gptq(weight, hessian, Scheme(4, 128, True)), 1), 3)
        acc = torch.zeros(in_f, in_f, device="cuda")
        xs = x.float()
        report[f"hessian_fp32_{in_f}_per_128x2048_s"] = round(timed(lambda: acc.addmm_(xs.T, xs)) * tokens / x.shape[0], 3)
        torch.backends.cuda.matmul.allow_tf32 = True
        report[f"hessian_tf32_{in_f}_per_128x2048_s"] = round(timed(lambda: acc.addmm_(xs.T, xs)) * tokens / x.shape[0], 3)
        torch.backends.cuda.matmul.allow_tf32 = False
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    layer = LlamaDecoderLayer(config, 0).cuda().half()
    rotary = LlamaRotaryEmbedding(config).cuda()
    hidden = torch.randn(8, 2048, 4096, device="cuda", dtype=torch.float16)
    positions = torch.arange(2048, device="cuda").unsqueeze(0)
    embeddings = rotary(hidden, positions)
    with torch.no_grad():
        report["block_forward_per_128x2048_s"] = round(
            timed(lambda: layer(hidden, position_embeddings=embeddings, position_ids=positions)) * 16, 3)
    print(json.dumps(report, indent=2))
    if len(sys.argv) > 1:
        open(sys.argv[1], "w").write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

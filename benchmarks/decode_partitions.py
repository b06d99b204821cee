"""The paged decode attention of one Llama-3-8B layer (32 heads, 8 kv heads, head_dim 128, blocks of
16 tokens, fp16) by partitions of each sequence's blocks and tokens an iteration (the kernel's
TILE), at 1 and 8 sequences of 128-1024 tokens: the median time of one call (the merge included
where there are partitions) in a CUDA graph of 32 calls, each on a layer's own cache, and the
largest difference from the reference.

usage: python benchmarks/decode_partitions.py OUT.json
"""

import json
import sys

import functools

import torch
import triton

from graph_timing import graph_us
from qtool.kernels import paged_attention

LAYERS, BLOCK, KV_HEADS, HEADS, HEAD_DIM = 32, 16, 8, 32, 128


def main() -> None:
    if len(sys.argv) != 2 or not torch.cuda.is_available():
        print("usage: python benchmarks/decode_partitions.py OUT.json, on a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    out, tile = {}, paged_attention.DECODE_TILE
    for sequences in (1, 8):
        for context in (128, 256, 384, 1024):
            blocks = triton.cdiv(context, BLOCK)
            k_caches = [torch.randn(sequences * blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda").half()
                        for _ in range(LAYERS)]
            v_caches = [torch.randn_like(k) for k in k_caches]
            tables = torch.arange(sequences * blocks, device="cuda", dtype=torch.int32).view(sequences, blocks)
            lens = torch.full((sequences,), context, device="cuda", dtype=torch.int32)
            q = torch.randn(sequences, HEADS, HEAD_DIM, device="cuda").half()
            reference = paged_attention.reference_decode(q, k_caches[0], v_caches[0], tables, lens, HEAD_DIM ** -0.5)
            for partitions in (1, 2, 4, 8, 16):
                for paged_attention.DECODE_TILE in (16, 32, 64):
                    def call(layer):
                        return paged_attention.triton_decode(q, k_caches[layer], v_caches[layer], tables, lens,
                                                             HEAD_DIM ** -0.5, partitions=partitions)
                    error = (call(0).float() - reference.float()).abs().max().item()
                    key = f"batch {sequences} ctx {context} partitions {partitions} tile {paged_attention.DECODE_TILE}"
                    out[key] = {"us": graph_us([functools.partial(call, layer) for layer in range(LAYERS)], rep=60),
                                "err": error}
                    print(key, f"{out[key]['us']:.2f} us, error {error:.1e}", flush=True)
            paged_attention.DECODE_TILE = tile
    with open(sys.argv[1], "w") as file:
        json.dump(out, file, indent=1)


if __name__ == "__main__":
    main()

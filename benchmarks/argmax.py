"""Greedy argmax over Llama-3's 128256 logits (fp16): torch's `argmax` against qtool's chunked
`first_argmax` (qtool.runtime.sampling), at 1, 8 and 64 rows; each the median time of one call in
a CUDA graph of 20 calls (triton.testing.do_bench). Checks that both give the same indices first.

usage: python benchmarks/argmax.py OUT.json
"""

import json
import sys

import torch

from graph_timing import graph_us
from qtool.runtime.sampling import first_argmax

VOCAB = 128256
CALLS = 20


def main() -> None:
    if len(sys.argv) != 2 or not torch.cuda.is_available():
        print("usage: python benchmarks/argmax.py OUT.json, on a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    times = {}
    for rows in (1, 8, 64):
        logits = torch.randn(rows, VOCAB, device="cuda").half()
        assert torch.equal(first_argmax(logits), logits.argmax(-1))
        for name, call in (("torch argmax", lambda: logits.argmax(-1)), ("first_argmax", lambda: first_argmax(logits))):
            times[f"{name} rows {rows}"] = graph_us([call] * CALLS)
            print(f"{name} [{rows}, {VOCAB}] fp16: {times[f'{name} rows {rows}']:.1f} us", flush=True)
    with open(sys.argv[1], "w") as file:
        json.dump(times, file, indent=1)


if __name__ == "__main__":
    main()

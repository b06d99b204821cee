"""RMSNorm (pending float32 sums plus the residual, rows of 4096, as after o_proj and down_proj) by
warps a row, and SiLU-and-multiply (pending, rows of 14336) by block and warps, at 1 and 8 rows:
the median time of one launch in a CUDA graph of 64, fp16 activations, launched plainly (not as
programmatic dependents).

usage: python benchmarks/elementwise_warps.py OUT.json
"""

import json
import sys

import torch
import triton

from graph_timing import graph_us
from qtool.kernels import elementwise
from qtool.kernels.pending import TL_DTYPES

LAUNCHES, HIDDEN, INTERMEDIATE = 64, 4096, 14336
FIXED = dict(PENDING=True, DTYPE=TL_DTYPES[torch.float16], PDL=False, **elementwise.TORCH_ROUNDING)


def main() -> None:
    if len(sys.argv) != 2 or not torch.cuda.is_available():
        print("usage: python benchmarks/elementwise_warps.py OUT.json, on a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    out = {}
    for rows in (1, 8):
        sums = torch.zeros(rows, HIDDEN, device="cuda")
        residual = torch.randn(rows, HIDDEN, device="cuda").half()
        weight = torch.rand(HIDDEN, device="cuda").half()
        normed, summed = torch.empty_like(residual), torch.empty_like(residual)
        for warps in (1, 2, 4, 8, 16, 32):
            out[f"rms_norm rows {rows} warps {warps}"] = graph_us([lambda: elementwise._rms_norm_kernel[(rows,)](
                sums, residual, weight, normed, summed, HIDDEN, 1e-5, HAS_RESIDUAL=True, BLOCK=HIDDEN,
                num_warps=warps, **FIXED)] * LAUNCHES, rep=40)
        gate_up = torch.zeros(rows, 2 * INTERMEDIATE, device="cuda")
        product = torch.empty(rows, INTERMEDIATE, device="cuda").half()
        for block, warps in ((1024, 4), (1024, 2), (2048, 4), (2048, 8), (512, 2), (4096, 8)):
            out[f"silu_mul rows {rows} block {block} warps {warps}"] = graph_us([
                lambda: elementwise._silu_mul_kernel[(rows, triton.cdiv(INTERMEDIATE, block))](
                    gate_up, gate_up[:, INTERMEDIATE:], product, INTERMEDIATE, 2 * INTERMEDIATE, 2 * INTERMEDIATE,
                    BLOCK=block, num_warps=warps, **FIXED)] * LAUNCHES, rep=40)
    for key, us in out.items():
        print(f"{key}: {us:.2f} us")
    with open(sys.argv[1], "w") as file:
        json.dump(out, file, indent=1)


if __name__ == "__main__":
    main()

"""The Gluon int8 GEMM (kernels/int8_wgmma.py) over a grid of tiles, ring depths and warps: first its
exactness against the reference on odd shapes (every fifth configuration), then its time on the
Llama-3-8B shapes at 256 and 1024 tokens against fp16 `F.linear` and the tuned GEMM (`gemm`: on
Hopper its tuner times these tiles too, since 25bbe60; the committed grid ran before that). The
tuner's wgmma candidates come from here. Writes JSON to --out (results: int8_gemm_h200_wgmma_grid.json,
the defaults, split 1 only, before K could be split; int8_gemm_h200_wgmma_split_grid.json).

usage: python benchmarks/int8_wgmma_grid.py --out OUT.json [--shapes 4096x1024 ...] [--tokens 256 1024]
                                           [--splits 1 2 4] [--block-k 64 128 256] [--skip-check]"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import copies_for, graph_time, shape  # noqa: E402

from qtool.kernels import int8_wgmma  # noqa: E402
from qtool.kernels.int8_matmul import _TUNER, Int8Weight, gemm, triton_quantize  # noqa: E402

_TUNER.persist = False
TILES = [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8), (64, 256, 4),
         (256, 128, 8), (128, 64, 8), (64, 32, 4)]


def configs(block_ks=(64, 128, 256), splits=(1,)):
    for bm, bn, warps in TILES:
        for bk in block_ks:
            for stages in (3, 4, 5, 6):
                if stages * (bm + bn) * bk > 225 * 1024:
                    continue
                for split in splits:
                    yield dict(WGMMA=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
                               num_stages=stages, GROUP_M=8)


def expected(codes, scales, w, bias, dtype):
    sums = codes.double() @ w.codes.double().t()
    out = (sums.float() * scales) * w.scales
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def check():
    bad, worst = [], 0.0
    for m, n, k, with_bias, dtype in ((256, 1024, 4096, False, torch.float16), (17, 96, 160, True, torch.float16),
                                      (300, 4096, 14336, False, torch.bfloat16), (1, 200, 4112, True, torch.float16),
                                      (129, 520, 1040, False, torch.float16)):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        codes, scales = triton_quantize(x)
        w = Int8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"), torch.rand(n, device="cuda") * 0.01)
        bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
        want = expected(codes, scales, w, bias, dtype).float()
        for config in list(configs(splits=(1, 3)))[::5]:
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            try:
                int8_wgmma.launch(codes, scales, w.codes, w.scales, bias, out, config)
            except triton.runtime.errors.OutOfResources:
                continue
            err = ((out.float() - want).abs() / want.abs().clamp(min=1e-3)).max().item()
            worst = max(worst, err)
            if not err < 1e-2:
                bad.append(f"{m}x{n}x{k} {config}: {err}")
    return bad, worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", type=shape, metavar="INxOUT",
                        default=[(4096, 1024), (4096, 4096), (14336, 4096), (4096, 14336)])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--splits", type=int, nargs="+", default=[1])
    parser.add_argument("--block-k", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
           "command": "python " + " ".join(sys.argv)}
    if not args.skip_check:
        bad, worst = check()
        out["check"] = {"bad": bad[:20], "n_bad": len(bad), "worst_rel": worst}
        print("check: bad", len(bad), bad[:3], "worst", worst, flush=True)
    out["cases"] = []
    start = time.time()
    for k, n in args.shapes:
        copies = copies_for(n * k * 2)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        int8 = [Int8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
                           torch.rand(n, device="cuda") * 0.01) for _ in range(copies)]
        for m in args.tokens:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
            qs = [triton_quantize(x) for x in xs]
            ys = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
            fp16 = graph_time(lambda i: (lambda: F.linear(xs[i], dense[i])), copies)
            tuned = graph_time(lambda i: (lambda: gemm(*qs[i], int8[i], None, torch.float16)), copies)
            case = {"K": k, "N": n, "M": m, "fp16_us": fp16 * 1e6, "tuned": [fp16 / tuned, tuned * 1e6],
                    "wgmma": [], "errors": []}
            for config in configs(args.block_k, args.splits):
                if m < config["BLOCK_M"]:
                    continue
                try:
                    t = graph_time(lambda i: (lambda: int8_wgmma.launch(*qs[i], int8[i].codes, int8[i].scales, None,
                                                                         ys[i], config)), copies)
                    case["wgmma"].append([fp16 / t, t * 1e6, config])
                except Exception as error:  # noqa: BLE001
                    case["errors"].append(f"{config}: {type(error).__name__} {str(error)[:100]}")
            case["wgmma"].sort(key=lambda row: -row[0])
            out["cases"].append(case)
            print(k, n, m, f"fp16 {fp16 * 1e6:.1f}us tuned {fp16 / tuned:.2f}x", "wgmma best",
                  [(round(r[0], 2), round(r[1], 1),
                    "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} split {SPLIT_K} w{num_warps} s{num_stages}".format(**r[2]))
                   for r in case["wgmma"][:5]], "errors", len(case["errors"]), f"{time.time() - start:.0f}s", flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))


main()

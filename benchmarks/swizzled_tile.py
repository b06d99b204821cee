"""An experiment for 16-64 tokens, not part of qtool's kernels yet (kernels_h200.md, next steps):
y = x @ W^T for 4-bit codes with a zero and a scale per group of 64, the codes rearranged once
("swizzled") so that the dequantized tile reaches Hopper's wgmma as its first operand straight from
registers. qtool's tiles of 16-64 tokens round-trip the dequantized weights through shared memory
(STS + LDSM and their barriers), which Triton keeps for any chain from packed words to fp16 that
its hoisting pass cannot follow. Triton's own `triton_kernels` avoids the question for mxfp4 on
Hopper: it stores the codes in the order each thread will hold them, upcasts them by inline PTX and
puts them in place by join/reshape/trans alone, so that the layout Triton infers is already the dot
operand's. The same here for uniform 4-bit grids:

- `swizzle` orders each tile of BLOCK_N rows x 128 inputs (two groups) as bytes of two codes, found
  by tracking storage indices through `rearranged` (the kernel's chain, in torch);
- the kernel loads a tile's bytes (cp.async, 16 bytes a thread), makes 1024 + q in fp16 (`UPCAST`:
  SHR, PRMT and LOP3, 9 instructions a word of 8 codes), rearranges, splits the two groups,
  subtracts 1024 + zero and multiplies by the scale in fp16 (one rounding, as qtool's half2 tiles),
  and runs one dot per group with the tokens as the dot's columns.

Compiled for sm_90 on a machine without a GPU (Triton 3.9 and 3.6), the dequantized weights meet
no shared-memory store or shuffle before the wgmma. `check` tests the kernel (plain-op upcast under
TRITON_INTERPRET=1, the PTX on a GPU) against the reference; `time` times it on Llama-3-8B shapes
at 16-64 tokens against fp16 `F.linear` (CUDA graphs over copies larger than L2, as the tuner).

usage: python benchmarks/swizzled_tile.py check | time OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

GROUP, BLOCK_K = 64, 128
UPCAST = """{
.reg .b32 hi, t;
shr.u32 hi, $4, 4;
prmt.b32 t, $4, 0, 0x4140;
lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea;
prmt.b32 t, $4, 0, 0x4342;
lop3.b32 $1, t, 0x000f000f, 0x64006400, 0xea;
prmt.b32 t, hi, 0, 0x4140;
lop3.b32 $2, t, 0x000f000f, 0x64006400, 0xea;
prmt.b32 t, hi, 0, 0x4342;
lop3.b32 $3, t, 0x000f000f, 0x64006400, 0xea;
}"""  # four bytes -> 1024 + their low codes ($0, $1) and high codes ($2, $3) in fp16, bytes in order


def rearranged(values: torch.Tensor) -> torch.Tensor:
    """The kernel's chain on one tile, in torch: [R, C, 2] (each byte's low and high code) ->
    [4R, C / 2], the tile's rows of weights and its inputs."""
    rows, width, _ = values.shape
    values = values.reshape(rows, width // 4, 4, 2).permute(0, 1, 3, 2).reshape(rows, width * 2)
    rows, width = values.shape
    values = values.reshape(rows // 4, 4, width // 256, 2, 4, 8, 2, 2).permute(0, 6, 1, 3, 2, 5, 4, 7)
    return values.reshape(rows * 4, width // 4)


def swizzle(codes: torch.Tensor, block_n: int) -> torch.Tensor:
    """codes [N, K] (0-15) -> bytes [N / 4, 2K]: tile (n, k) of block_n x 128 codes at rows
    n * block_n / 4 and columns k * 256, each byte's two codes where `rearranged` takes them."""
    n, k = codes.shape
    rows, width = block_n // 4, 2 * BLOCK_K
    slots = rearranged(torch.arange(rows * width * 2, device=codes.device).reshape(rows, width, 2)).flatten()
    tiles = codes.reshape(n // block_n, block_n, k // BLOCK_K, BLOCK_K).permute(0, 2, 1, 3)
    tiles = tiles.reshape(n // block_n, k // BLOCK_K, -1)[..., torch.argsort(slots)]
    packed = (tiles[..., 0::2] | tiles[..., 1::2] << 4).to(torch.uint8)
    return packed.reshape(n // block_n, k // BLOCK_K, rows, width).permute(0, 2, 1, 3).reshape(n // 4, 2 * k).contiguous()


if triton is not None:
    _UPCAST = tl.constexpr(UPCAST)

    @triton.jit
    def _upcast(codes, ASM: tl.constexpr):
        """Bytes [R, C] -> fp16 [R, 2C], 1024 + each code, in the order `rearranged` starts from."""
        if ASM:
            low, high = tl.inline_asm_elementwise(asm=_UPCAST, constraints="=r,=r,=r,=r,r", args=[codes],
                                                  dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:  # the interpreter runs no PTX
            wide = codes.to(tl.int32)
            low = ((wide & 15) + 1024).to(tl.float16)
            high = (((wide >> 4) & 15) + 1024).to(tl.float16)
        values = tl.join(low, high)
        values = values.reshape(values.shape[0], values.shape[1] // 4, 4, 2).trans(0, 1, 3, 2)
        return values.reshape(values.shape[0], values.shape[1] * values.shape[2] * values.shape[3])

    @triton.jit
    def _rearrange(values):
        ROWS: tl.constexpr = values.shape[0]
        WIDTH: tl.constexpr = values.shape[1]
        values = values.reshape(ROWS // 4, 4, WIDTH // 256, 2, 4, 8, 2, 2).trans(0, 6, 1, 3, 2, 5, 4, 7)
        return values.reshape(ROWS * 4, WIDTH // 4)

    @triton.jit
    def _swizzled_kernel(w_ptr, s_ptr, z_ptr, x_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                         STAGES: tl.constexpr, ASM: tl.constexpr):
        """y [M, N] float32 += x W^T over this program's share of K, tiles of BLOCK_N weights x 128
        inputs; scales and 1024 + zeros [K / 64, N] fp16."""
        TILE_K: tl.constexpr = 128
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_n * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
        columns = tl.arange(0, 2 * TILE_K)
        outputs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        in_m = tokens < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for start in tl.range(pid_k * TILE_K, K, TILE_K * tl.num_programs(1), num_stages=STAGES):
            codes = tl.load(w_ptr + rows[:, None] * (2 * K) + (2 * start + columns)[None, :])
            first, second = _rearrange(_upcast(codes, ASM)).reshape(BLOCK_N, 2, TILE_K // 2).trans(0, 2, 1).split()
            group = start // 64
            first = (first - tl.load(z_ptr + group * N + outputs)[:, None]) * tl.load(s_ptr + group * N + outputs)[:, None]
            second = ((second - tl.load(z_ptr + (group + 1) * N + outputs)[:, None])
                      * tl.load(s_ptr + (group + 1) * N + outputs)[:, None])
            inputs = start + tl.arange(0, TILE_K // 2)
            x_first = tl.load(x_ptr + tokens[None, :] * K + inputs[:, None], mask=in_m[None, :], other=0.0)
            x_second = tl.load(x_ptr + tokens[None, :] * K + (inputs + TILE_K // 2)[:, None], mask=in_m[None, :],
                               other=0.0)
            acc = tl.dot(first, x_first, acc)
            acc = tl.dot(second, x_second, acc)
        tl.atomic_add(y_ptr + tokens[None, :] * N + outputs[:, None], acc, mask=in_m[None, :], sem="relaxed")


def product(x, packed, scales, zeros, n, block_n=64, block_m=16, split=1, stages=3, warps=4, out=None):
    """x @ W^T in float32 (added into `out` when given)."""
    m, k = x.shape
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if out is None else out
    _swizzled_kernel[(n // block_n, split, triton.cdiv(m, block_m))](
        packed, scales, zeros, x, out, m, n, k, BLOCK_N=block_n, BLOCK_M=block_m, STAGES=stages,
        ASM=os.environ.get("TRITON_INTERPRET") != "1", num_warps=warps, num_stages=stages)
    return out


def operands(m: int, n: int, k: int, device: str, seed: int = 0):
    """x, codes, scales, 1024 + zeros (as the kernel takes them) and the dequantized W in fp16."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=generator)
    scales = (torch.rand(k // GROUP, n, generator=generator) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=generator)
    x = torch.randn(m, k, generator=generator).half()
    weight = ((codes - zeros.T.repeat_interleave(GROUP, 1)).half() * scales.T.repeat_interleave(GROUP, 1)).half()
    return [tensor.to(device) for tensor in (x, codes, scales, (zeros + 1024).half(), weight)]


def relative_error(m: int, n: int, k: int, device: str, **config) -> float:
    x, codes, scales, zeros, weight = operands(m, n, k, device)
    y = product(x, swizzle(codes, config.get("block_n", 64)), scales, zeros, n, **config)
    reference = x.float() @ weight.float().T
    return ((y - reference).norm() / reference.norm()).item()


def timings() -> dict:
    """Microseconds of fp16 F.linear and of each swizzled configuration, Llama-3-8B shapes, 16-64 tokens."""
    sys.path.insert(0, os.path.dirname(__file__))
    from graph_timing import graph_us
    from qtool.kernels.quant_matmul import copies_to_fill_l2

    times = {}
    for k, n in ((4096, 14336), (14336, 4096), (4096, 4096)):
        for m in (16, 32, 64):
            x, codes, scales, zeros, weight = operands(m, n, k, "cuda")
            dense = [weight.clone() for _ in range(copies_to_fill_l2(weight.nbytes))]
            times[f"{k}x{n} M={m} fp16"] = fp16 = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])
            best = None
            for block_n, warps in ((64, 4), (128, 4), (128, 8)):
                packed = swizzle(codes, block_n)
                copies = [packed.clone() for _ in range(copies_to_fill_l2(packed.nbytes))]
                out = torch.zeros(m, n, device="cuda")
                for split in (1, 2, 4, 8):
                    for stages in (3, 4):
                        for block_m in (block for block in (16, 32, 64) if block <= max(m, 16)):
                            config = dict(block_n=block_n, block_m=block_m, split=split, stages=stages, warps=warps)
                            try:
                                us = graph_us([lambda p=p: product(x, p, scales, zeros, n, out=out, **config)
                                               for p in copies])
                            except triton.runtime.errors.OutOfResources:
                                continue
                            times[f"{k}x{n} M={m} " + " ".join(f"{key} {value}" for key, value in config.items())] = us
                            best = min(best or (us, config), (us, config), key=lambda timed: timed[0])
            print(f"{k}x{n} M={m}: fp16 {fp16:.1f} us, swizzled {best[0]:.1f} us ({fp16 / best[0]:.2f}x) {best[1]}",
                  flush=True)
    return times


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("check", "time") or (sys.argv[1] == "time") != (len(sys.argv) == 3):
        print("usage: python benchmarks/swizzled_tile.py check | time OUT.json", file=sys.stderr)
        raise SystemExit(2)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not torch.cuda.is_available() and (sys.argv[1] == "time" or not interpreted):
        print("this needs Triton and a CUDA GPU (`check` runs without one under TRITON_INTERPRET=1)", file=sys.stderr)
        raise SystemExit(2)
    device = "cpu" if interpreted else "cuda"
    for m, n, k, config in ((16, 128, 256, {}), (3, 128, 512, dict(split=2)), (20, 128, 256, dict(block_n=128)),
                            (64, 64, 256, dict(block_m=64))):
        error = relative_error(m, n, k, device, **config)
        print(f"check on {device}: M={m} N={n} K={k} {config}: relative error {error:.1e}", flush=True)
        assert error < 2e-3
    if sys.argv[1] == "time":
        with open(sys.argv[2], "w") as file:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           microseconds=timings()), file, indent=1)


if __name__ == "__main__":
    main()

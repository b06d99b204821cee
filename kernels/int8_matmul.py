"""y = x @ W^T (+ bias) for W8A8: int8 weights with a scale per output channel, and activations
quantized to int8 per token on the fly (scale max|x| / 127 per row, as SmoothQuant and vLLM's
dynamic per-token scheme do).

The weight is read as `Int8Weight`: the codes int8 [N, K] with K contiguous, exactly as they are
stored, and the scales in float32 [N]. Int8 tensor-core products (Hopper's wgmma and Ampere's mma
alike) and cuBLAS's int8 GEMM want both operands contiguous along K, so no transposed copy is made;
the only cost is the int8 copy of the codes itself (N * K bytes, as large as the packed 8-bit
codes it is made from) plus 4 * N bytes of scales.

Four things, as every kernel here:
- `quantize_per_token` and `reference`: the plain-torch definition. The integer products are
  summed exactly (float64 holds sums of int8 products exactly for any K below 2^39); the
  epilogue multiplies by the token's and then the channel's scale in float32, adds the bias in
  float32, and casts to the activations' dtype. It runs anywhere.
- `triton_quantize`: one program per row reads it once (amax, scale, round half to even,
  clamp), writing the int8 codes and the float32 scale: bit for bit `quantize_per_token`.
- `triton_matmul`: one of two paths, chosen per (M bucket, N, K, dtype) by timing the whole
  call once on the device:
  - separate: `triton_quantize`, then `gemm`, an int8 x int8 -> int32 tensor-core GEMM
    (`tl.dot`) with the epilogue fused (scales, bias, cast), K optionally split among programs
    that add into an int32 workspace (exact) and the last of which writes y; or `torch._int_mm`
    (cuBLAS) and a fused epilogue kernel (tile shapes tuned the same way, on the codes). On
    Hopper the Triton GEMM is launched as a programmatic dependent of the quantization (PDL): it
    is scheduled while the quantization runs and waits for its writes in `gdc_wait`;
  - fused: one launch quantizes inside the GEMM. Each program takes its rows' amax over the
    whole of K from x, then quantizes each [BLOCK_M, BLOCK_K] tile of x in registers, as
    `triton_quantize` does, before its `tl.dot`; no int8 copy of x is written, but every
    program along N repeats its rows' quantization.
- `int8_matmul`: the dispatcher: the kernels on CUDA, the reference elsewhere, with
  QTOOL_KERNELS=reference, or for shapes the kernels refuse (`kernel_fits`).

Speed on an H200 against fp16 `F.linear` (benchmarks/results/int8_gemm_h200.md): from 1024
tokens the GEMM alone is 1.70-1.93x on the 4096x4096, 4096x14336, 14336x4096 and 8192x8192
shapes, and the whole call 1.41-1.79x; at 256 tokens the whole call is 0.91-1.46x there (the
GEMM alone 1.11-1.60x), and on 4096x1024 it is 0.68-1.05x from 256 tokens up: the quantization
launch costs as much as a large part of so small a product. Neither larger tiles split along K
nor launching the GEMM as the quantization's programmatic dependent moved the 256-token figures
beyond the run-to-run spread. The fused kernel is 2 to 6 times slower than the two launches
(0.16-0.38x fp16 from 256 tokens, 0.20-0.80x at 16 and 64): its programs along N repeat their
rows' amax pass and the division per element, so the quantization's arithmetic, not bytes, bounds
it; the tuner never chose it. For 16-64 tokens the product is bound by reading the weight (int8
halves fp16's bytes): the GEMM alone 0.98-1.78x, the whole call 0.74-1.64x. `torch._int_mm`
plus the epilogue (0.64-1.45x) was never the faster path there, but stays a candidate.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from qtool.kernels.quant_matmul import _launch_options, _Tuner, _workspace

try:
    import triton
    import triton.language as tl

    from qtool.kernels.quant_matmul import _below
except ImportError:  # no Triton (macOS, or a stripped install): the reference path serves
    triton = None

INT8_MAX = 127
MAX_ROW = 32768  # the quantization kernel holds a whole row in registers
K_MULTIPLE = 16  # rows of codes start 16-byte aligned, so tiles load in 16-byte vectors


class Int8Weight(NamedTuple):
    """The weight as the kernels read it: codes int8 [N, K] (K contiguous), scales float32 [N]."""

    codes: torch.Tensor
    scales: torch.Tensor


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [rows, K] and float32 scales [rows, 1] of `x` viewed as rows of its last dimension."""
    rows = x.reshape(-1, x.shape[-1]).float()
    amax = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    # a tensor divisor: by a Python number, torch's CUDA kernels multiply by its float32 reciprocal
    # instead of dividing, which rounds some scales differently from the CPU
    scales = amax / torch.full_like(amax, INT8_MAX)
    return torch.round(rows / scales).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def reference(x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times int8 `weight` [N, K] with float `weight_scales` [N], plus `bias` [N]."""
    codes, scales = quantize_per_token(x)
    sums = codes.double() @ weight.double().t()
    out = (sums.float() * scales) * weight_scales.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N]: `reference`'s result, by the fastest path this device and shape allow."""
    if not kernel_fits(x, weight):
        return reference(x, weight, weight_scales, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = triton_matmul(rows, Int8Weight(weight, weight_scales.float()), bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels run this product: on CUDA, fp16/bf16/fp32 activations, K a multiple of
    16 and at most MAX_ROW, N * K below 2^31 (32-bit weight offsets)."""
    k = x.shape[-1]
    return (
        triton is not None and x.is_cuda and os.environ.get("QTOOL_KERNELS") != "reference"
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k % K_MULTIPLE == 0 and k <= MAX_ROW and weight.numel() < 2**31
    )


def int_mm_fits(m: int, n: int, k: int) -> bool:
    """What `torch._int_mm` takes on CUDA: more than 16 rows, K and N multiples of 8."""
    return m > 16 and k % 8 == 0 and n % 8 == 0


def triton_quantize(x: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token` of x [M, K] (K contiguous) by the Triton kernel, with `config`'s
    num_warps or, on CUDA, the tuned one."""
    m, k = x.shape
    if x.stride(1) != 1 or k > MAX_ROW:
        raise ValueError(f"the quantization kernel takes rows of at most {MAX_ROW} contiguous values, got "
                         f"{k} with stride {x.stride(1)}: call quantize_per_token instead")
    codes = torch.empty((m, k), device=x.device, dtype=torch.int8)
    scales = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    row = triton.next_power_of_2(k)

    def launch(chosen):
        _quantize_kernel[(m,)](x, codes, scales, k, x.stride(0), ROW=row, PDL=_pdl(x.device), **chosen)

    if config is None and x.is_cuda:
        options = [dict(num_warps=warps) for warps in (1, 2, 4, 8, 16) if warps == 1 or 64 * warps <= row]
        config = _TUNER.choose(("quantize", m_bucket(m), k, x.dtype), launch, options)
    launch(config or dict(num_warps=4))
    return codes, scales


def m_bucket(m: int) -> int:
    """Token counts that share a tuned configuration."""
    return next(bound for bound in (16, 64, 256, 1024, 4096, 1 << 30) if m <= bound)


SEPARATE = dict(SEPARATE=True)  # the call's candidate "triton_quantize, then the tuned gemm"


def triton_matmul(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype, by the path the tuner chose for the whole call or by
    `config`: FUSED (quantization inside the GEMM, with BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages), SEPARATE (`triton_quantize`, then the tuned `gemm`), or else a
    configuration of `gemm` run after `triton_quantize`."""
    (m, k), n = x.shape, weight.codes.shape[0]
    if k % K_MULTIPLE or weight.codes.shape[1] != k or weight.codes.stride(1) != 1:
        raise ValueError(f"the int8 GEMM takes K a multiple of {K_MULTIPLE} and codes [N, K] with K contiguous, got "
                         f"x {tuple(x.shape)}, codes {tuple(weight.codes.shape)}: use int8_matmul, which falls back "
                         "to the reference")
    x = x.contiguous()
    if config is None:
        config = _TUNER.choose(("call", m_bucket(m), n, k, x.dtype),
                               lambda chosen: _call(x, weight, bias, chosen), call_candidates(m))
    return _call(x, weight, bias, config)


def _call(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    if not config.get("FUSED"):
        codes, scales = triton_quantize(x)
        return gemm(codes, scales, weight, bias, x.dtype, None if config.get("SEPARATE") else config,
                    after_quantize=True)
    (m, k), n = x.shape, weight.codes.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _fused_kernel[grid](
        x, weight.codes, weight.scales, weight.scales if bias is None else bias, out, m, n, k, x.stride(0),
        *weight.codes.stride(), HAS_BIAS=bias is not None, EVEN_K=k % config["BLOCK_K"] == 0,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_M=config.get("GROUP_M", 8), STAGES=config.get("num_stages", 1), **_launch_options(config))
    return out


def call_candidates(m: int) -> list[dict]:
    """The whole call's candidates: the separate path, and fused tiles. A fused program quantizes
    BLOCK_M rows of the whole of K (a division per element), so its tiles are short in M and long
    in N."""
    def fused(*shapes):
        return [dict(FUSED=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                     num_stages=stages)
                for block_m, block_n, block_k, warps, stages in shapes]

    by_bucket = {
        16: fused((16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (16, 32, 256, 4, 3)),
        64: fused((16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (32, 128, 128, 4, 3), (64, 128, 128, 4, 3)),
        256: fused((32, 128, 128, 4, 3), (32, 256, 128, 8, 3), (64, 128, 128, 4, 3), (64, 256, 128, 8, 3)),
    }
    return [SEPARATE] + by_bucket.get(m_bucket(m), fused((64, 256, 128, 8, 3), (128, 128, 128, 8, 3)))


def gemm(codes: torch.Tensor, scales: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
         dtype: torch.dtype, config: dict | None = None, after_quantize: bool = False) -> torch.Tensor:
    """int8 codes [M, K] with token scales [M, 1] times the weight, y [M, N] in `dtype`. `config`
    fixes BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K (programs along K), GROUP_M and num_warps / num_stages
    of the Triton GEMM, or INT_MM (`torch._int_mm`) with the epilogue's BLOCK_M, BLOCK_N, instead of
    the tuned choice: tests under TRITON_INTERPRET=1 use it. `after_quantize`: the codes come from
    the launch just before on this stream, so the Triton GEMM may start as its dependent (PDL)."""
    (m, k), n = codes.shape, weight.codes.shape[0]
    if config is None:
        config = _TUNER.choose((m_bucket(m), n, k, dtype),
                               lambda chosen: _launch(codes, scales, weight, bias, dtype, chosen), candidates(m, n, k))
    return _launch(codes, scales, weight, bias, dtype, config, after_quantize and _pdl(codes.device))


@functools.cache
def _pdl(device: torch.device) -> bool:
    """Whether launches on `device` may be programmatic dependents (Hopper and later, a Triton that
    has `launch_pdl`, not the interpreter, not turned off by QTOOL_PDL=0)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("QTOOL_PDL") == "0":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return ("launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _launch(codes: torch.Tensor, scales: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
            dtype: torch.dtype, config: dict, pdl: bool = False) -> torch.Tensor:
    """One product of int8 codes [M, K] (token scales [M, 1]) by the configuration's path; `pdl`:
    launched as a programmatic dependent of the launch before (the Triton GEMM waits for it)."""
    (m, k), n = codes.shape, weight.codes.shape[0]
    out = torch.empty((m, n), device=codes.device, dtype=dtype)
    bias_arg = weight.scales if bias is None else bias
    blocks = dict(BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"])
    if config.get("INT_MM"):
        if not int_mm_fits(m, n, k):
            raise ValueError(f"torch._int_mm takes M > 16 and K, N multiples of 8, got {m}x{k} by {n}: "
                             "choose a Triton configuration")
        sums = torch._int_mm(codes, weight.codes.t())
        grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
        _epilogue_kernel[grid](sums, scales, weight.scales, bias_arg, out, m, n, HAS_BIAS=bias is not None, **blocks,
                               **_launch_options(config))
        return out
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    split = config["SPLIT_K"] > 1
    workspace, arrivals = _workspace(codes.device, m * n if split else 1, tiles if split else 1)
    _gemm_kernel[(tiles, config["SPLIT_K"])](
        codes, scales, weight.codes, weight.scales, bias_arg, out, workspace.view(torch.int32), arrivals, m, n, k,
        *weight.codes.stride(), HAS_BIAS=bias is not None, SPLIT=split, EVEN_K=k % config["BLOCK_K"] == 0, **blocks,
        BLOCK_K=config["BLOCK_K"], GROUP_M=config.get("GROUP_M", 8), STAGES=config.get("num_stages", 1), PDL=pdl,
        **_launch_options(config), **(dict(launch_pdl=True) if pdl else {}))
    return out


_TUNER = _Tuner()


def candidates(m: int, n: int, k: int) -> list[dict]:
    """The configurations worth timing for m tokens: 16-row tiles with K split among programs for a
    few tokens (the weight's bytes bound the time, so many programs must stream it), 64- to 256-row
    tiles (wgmma) for more, split along K where the tiles are too few for the chip (small N, or
    256 tokens), and `torch._int_mm` wherever it takes the shape."""
    def tiles(*shapes):
        return [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                     num_stages=stages)
                for block_m, block_n, block_k, split, warps, stages in shapes]

    by_bucket = {
        16: tiles((16, 64, 256, 1, 4, 4), (16, 64, 256, 4, 4, 4), (16, 128, 256, 2, 4, 3), (16, 32, 256, 4, 4, 4),
                  (16, 64, 128, 8, 4, 4)),
        64: tiles((16, 64, 256, 1, 4, 4), (16, 64, 256, 4, 4, 4), (64, 64, 256, 1, 4, 4), (64, 128, 128, 1, 4, 4),
                  (64, 128, 256, 2, 4, 3), (64, 64, 128, 4, 4, 4)),
        256: tiles((64, 64, 256, 1, 4, 4), (64, 128, 128, 1, 4, 4), (64, 128, 128, 2, 4, 4), (64, 64, 256, 2, 4, 4),
                   (128, 64, 128, 1, 4, 4), (128, 128, 128, 1, 8, 3), (128, 128, 128, 2, 8, 3),
                   # large tiles read x and W fewer times from L2; K split so that they still fill the chip
                   (128, 128, 128, 4, 8, 4), (128, 256, 128, 2, 8, 3), (128, 256, 128, 4, 8, 3),
                   (256, 128, 128, 2, 8, 3), (256, 128, 128, 4, 8, 3), (128, 128, 128, 8, 8, 3)),
        1024: tiles((128, 128, 128, 1, 8, 3), (128, 128, 128, 1, 8, 4), (64, 128, 128, 1, 4, 4),
                    (128, 64, 128, 1, 4, 4), (128, 128, 128, 2, 8, 3), (64, 64, 256, 1, 4, 4),
                    (128, 256, 128, 1, 8, 3), (256, 128, 128, 1, 8, 3), (128, 128, 128, 4, 8, 3),
                    (64, 128, 128, 2, 4, 4)),
    }
    chosen = by_bucket.get(m_bucket(m)) or tiles(  # more tokens: large tiles, and smaller ones for small N
        (128, 128, 128, 1, 8, 3), (128, 128, 128, 1, 8, 4), (128, 256, 128, 1, 8, 3), (256, 128, 128, 1, 8, 3),
        (64, 128, 128, 1, 4, 4), (128, 64, 128, 1, 4, 4))
    if int_mm_fits(m, n, k):
        chosen = chosen + [dict(INT_MM=True, BLOCK_M=64, BLOCK_N=128, num_warps=4)]
    return chosen


if triton is not None:

    @triton.jit
    def _round_half_even(v):
        """torch.round of |v| <= 2**22: adding 1.5 * 2**23 moves v where consecutive floats are the
        integers, so the addition rounds it, half to even as IEEE does, and taking it away is exact."""
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _scale_of(amax):
        """`quantize_per_token`'s scale of a row: max(amax, 1e-12) / 127 by an IEEE division."""
        return tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)

    @triton.jit
    def _codes(x, scale):
        """clamp(round(x / scale), -127, 127) in int8, with an IEEE division (div_rn) as torch's."""
        return tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)), -127.0), 127.0).to(tl.int8)

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, ROW: tl.constexpr, PDL: tl.constexpr):
        """One row: its amax, scale and codes. PDL: let a dependent launch (the GEMM) be scheduled
        at once; it waits for this grid's writes itself."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, ROW)
        in_k = ks < K
        x = tl.load(x_ptr + row * stride_x + ks, mask=in_k, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(x), axis=0))
        tl.store(q_ptr + row * K + ks, _codes(x, scale), mask=in_k)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _scale_and_store(sums, rows_m, in_m, cols_n, in_n, sa_ptr, sw_ptr, bias_ptr, y_ptr, N,
                         HAS_BIAS: tl.constexpr):
        """The epilogue with the token scales read from sa_ptr."""
        token = tl.load(sa_ptr + rows_m, mask=in_m, other=0.0)
        _store(sums, token, rows_m, in_m, cols_n, in_n, sw_ptr, bias_ptr, y_ptr, N, HAS_BIAS)

    @triton.jit
    def _store(sums, token, rows_m, in_m, cols_n, in_n, sw_ptr, bias_ptr, y_ptr, N, HAS_BIAS: tl.constexpr):
        """The epilogue, `reference`'s: y = sums * token scale * channel scale (+ bias) in float32,
        cast to y's dtype."""
        channel = tl.load(sw_ptr + cols_n, mask=in_n, other=0.0)
        out = sums.to(tl.float32) * token[:, None] * channel[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows_m[:, None] * N + cols_n[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=in_m[:, None] & in_n[None, :])

    @triton.jit
    def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Program pid's tile: tiles go in groups of GROUP_M tile rows, column by column within a
        group, so that programs running together share rows of x and columns of W in L2."""
        tiles_n = tl.cdiv(N, BLOCK_N)
        first = pid // (GROUP_M * tiles_n) * GROUP_M
        size = tl.minimum(tl.cdiv(M, BLOCK_M) - first, GROUP_M)
        inside = pid % (GROUP_M * tiles_n)
        return first + inside % size, inside // size

    @triton.jit
    def _gemm_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, bias_ptr, y_ptr, ws_ptr, arrivals_ptr, M, N, K,
                     stride_wn, stride_wk, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     STAGES: tl.constexpr, PDL: tl.constexpr):
        """A [BLOCK_M, BLOCK_N] tile of y over this program's share of K: int8 tiles of codes (x's
        [BLOCK_M, BLOCK_K], W's [BLOCK_K, BLOCK_N]; stride_wk is 1 but in the benchmark's layout
        probe) into an int32 accumulator on the tensor cores; split along K, the shares add into the
        int32 workspace and the last to arrive applies the epilogue and sets the workspace and its
        counter back to zero. PDL: launched as the quantization's dependent, it waits for its writes."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rows_m < M, cols_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        # software-pipelined: STAGES - 1 tiles' loads in flight (through shared memory) during the products
        for start in tl.range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * tl.num_programs(1), num_stages=STAGES):
            ks = start + tl.arange(0, BLOCK_K)
            in_k = _below(ks, K, EVEN_K)
            a = tl.load(a_ptr + rows_m[:, None] * K + ks[None, :], mask=in_m[:, None] & in_k[None, :], other=0)
            w = tl.load(w_ptr + cols_n[None, :] * stride_wn + ks[:, None] * stride_wk,
                        mask=in_k[:, None] & in_n[None, :], other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        if SPLIT:
            offsets = rows_m[:, None] * N + cols_n[None, :]
            mask = in_m[:, None] & in_n[None, :]
            tl.atomic_add(ws_ptr + offsets, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()  # every thread's share is in before one thread moves the count (acq_rel)
            counter = arrivals_ptr + tl.program_id(0)
            if tl.atomic_add(counter, 1) == tl.num_programs(1) - 1:
                total = tl.atomic_xchg(ws_ptr + offsets, tl.zeros(acc.shape, tl.int32), mask=mask, sem="relaxed")
                tl.atomic_xchg(counter, 0)
                _scale_and_store(total, rows_m, in_m, cols_n, in_n, sa_ptr, sw_ptr, bias_ptr, y_ptr, N, HAS_BIAS)
        else:
            _scale_and_store(acc, rows_m, in_m, cols_n, in_n, sa_ptr, sw_ptr, bias_ptr, y_ptr, N, HAS_BIAS)

    @triton.jit
    def _fused_kernel(x_ptr, w_ptr, sw_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_wk,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr):
        """A [BLOCK_M, BLOCK_N] tile of y from x itself: a first pass over K takes the rows' amax
        (exact in any order), the second quantizes each tile of x in registers as `_quantize_kernel`
        does (so the integer sums are the same) and multiplies it with W's int8 tile."""
        pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rows_m < M, cols_n < N
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :],
                        mask=in_m[:, None] & _below(ks, K, EVEN_K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = _scale_of(amax)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for start in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            ks = start + tl.arange(0, BLOCK_K)
            in_k = _below(ks, K, EVEN_K)
            x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=in_m[:, None] & in_k[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cols_n[None, :] * stride_wn + ks[:, None] * stride_wk,
                        mask=in_k[:, None] & in_n[None, :], other=0)
            acc = tl.dot(_codes(x.to(tl.float32), scale[:, None]), w, acc, out_dtype=tl.int32)
        _store(acc, scale, rows_m, in_m, cols_n, in_n, sw_ptr, bias_ptr, y_ptr, N, HAS_BIAS)

    @triton.jit
    def _epilogue_kernel(sums_ptr, sa_ptr, sw_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The epilogue over int32 sums [M, N] that `torch._int_mm` wrote: one read, one write."""
        rows_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rows_m < M, cols_n < N
        sums = tl.load(sums_ptr + rows_m[:, None] * N + cols_n[None, :], mask=in_m[:, None] & in_n[None, :], other=0)
        _scale_and_store(sums, rows_m, in_m, cols_n, in_n, sa_ptr, sw_ptr, bias_ptr, y_ptr, N, HAS_BIAS)

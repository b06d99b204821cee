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
- `triton_matmul`: `triton_quantize`, then an int8 x int8 -> int32 tensor-core GEMM (`tl.dot`)
  with the epilogue fused (scales, bias, cast), K optionally split among programs that add into
  an int32 workspace (exact) and the last of which writes y; on Hopper the same product by
  `int8_wgmma`'s Gluon kernel (each wgmma kept in flight, which Triton's `tl.dot` does not do for
  int32 accumulators); or `torch._int_mm` (cuBLAS) and a fused epilogue kernel. The path and tile
  shapes are chosen per (M bucket, N, K, dtype) by timing the candidates once on the device.
- `int8_matmul`: the dispatcher: the kernels on CUDA, the reference elsewhere, with
  QTOOL_KERNELS=reference, or for shapes the kernels refuse (`kernel_fits`).

Speed on an H200 against fp16 `F.linear` (benchmarks/results/int8_gemm_h200.md): from 256 tokens
the GEMM alone is 1.39-2.01x on the Llama-3-8B shapes (the Gluon kernel the tuner's choice at 64
tokens, mostly at 256 and on 4096x1024; Triton's at 1024-2048 on the larger shapes), and the whole
call 1.23-1.79x on 4096x4096, 4096x14336, 14336x4096 and 8192x8192, but 0.92-1.21x on 4096x1024,
where the separate quantization launch costs as much as a large part of so small a product. For
1-16 tokens the product is bound by reading the weight (int8 halves fp16's bytes): the GEMM alone
1.37-1.90x, the whole call 0.98-1.70x, the quantization launch costing 2.5-7.6 us. `torch._int_mm` plus the
epilogue (0.64-1.49x) was never the faster path there, but stays a candidate of the tuner.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from qtool.kernels import gluon_hopper, int8_wgmma
from qtool.kernels.dispatch import triton_runs
from qtool.kernels.quant_matmul import _launch_options, _Tuner, _workspace, copies_past_l2, m_bucket

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

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()

    def copy(self) -> "Int8Weight":
        """The same weight in new memory."""
        return Int8Weight(self.codes.clone(), self.scales.clone())


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
        triton_runs(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k % K_MULTIPLE == 0 and k <= MAX_ROW and weight.numel() < 2**31
    )


def wgmma_runs(codes: torch.Tensor, weight: Int8Weight) -> bool:
    """Whether `int8_wgmma` takes this product: Hopper (compute capability 9.x), a Triton with
    Gluon, both operands' rows contiguous and 16-byte aligned, as TMA reads them."""
    return (gluon_hopper.runs_on(codes.device)
            and all(rows.data_ptr() % 16 == 0 and rows.stride(0) % 16 == 0 and rows.stride(1) == 1
                    for rows in (codes, weight.codes)))


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
        _quantize_kernel[(m,)](x, codes, scales, k, x.stride(0), ROW=row, **chosen)

    if config is None and x.is_cuda:
        options = [dict(num_warps=warps) for warps in (1, 2, 4, 8, 16) if warps == 1 or 64 * warps <= row]
        config = _TUNER.choose(("quantize", m_bucket(m), k, x.dtype), lambda: [launch], options)
    launch(config or dict(num_warps=4))
    return codes, scales


def triton_matmul(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: activations quantized by `triton_quantize`, then `gemm`."""
    if x.shape[1] % K_MULTIPLE or weight.codes.shape[1] != x.shape[1] or weight.codes.stride(1) != 1:
        raise ValueError(f"the int8 GEMM takes K a multiple of {K_MULTIPLE} and codes [N, K] with K contiguous, got "
                         f"x {tuple(x.shape)}, codes {tuple(weight.codes.shape)}: use int8_matmul, which falls back "
                         "to the reference")
    codes, scales = triton_quantize(x.contiguous())
    return gemm(codes, scales, weight, bias, x.dtype, config)


def gemm(codes: torch.Tensor, scales: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
         dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """int8 codes [M, K] with token scales [M, 1] times the weight, y [M, N] in `dtype`. `config`
    fixes BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K (programs along K), GROUP_M and num_warps / num_stages
    of the Triton GEMM, or INT_MM (`torch._int_mm`) with the epilogue's BLOCK_M, BLOCK_N, instead of
    the tuned choice: tests under TRITON_INTERPRET=1 use it."""
    (m, k), n = codes.shape, weight.codes.shape[0]
    if config is None:
        config = _TUNER.choose((m_bucket(m), n, k, dtype), lambda: [
            functools.partial(_launch, codes, scales, copy, bias, dtype) for copy in copies_past_l2(weight)
        ], candidates(m, n, k, wgmma_runs(codes, weight)))
    return _launch(codes, scales, weight, bias, dtype, config)


def _launch(codes: torch.Tensor, scales: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
            dtype: torch.dtype, config: dict) -> torch.Tensor:
    """One product of int8 codes [M, K] (token scales [M, 1]) by the configuration's path."""
    (m, k), n = codes.shape, weight.codes.shape[0]
    out = torch.empty((m, n), device=codes.device, dtype=dtype)
    if config.get("WGMMA"):
        if not wgmma_runs(codes, weight):
            raise ValueError("the Gluon wgmma GEMM runs on compute capability 9.x with 16-byte aligned codes and a "
                             "Triton with Gluon: choose a Triton configuration")
        int8_wgmma.launch(codes, scales, weight.codes, weight.scales, bias, out, config)
        return out
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
        BLOCK_K=config["BLOCK_K"], GROUP_M=config.get("GROUP_M", 8), STAGES=config.get("num_stages", 1),
        **_launch_options(config))
    return out


_TUNER = _Tuner(__file__, int8_wgmma.__file__, gluon_hopper.__file__)  # a change to any times the choices again


def candidates(m: int, n: int, k: int, wgmma: bool = False) -> list[dict]:
    """The configurations worth timing for m tokens: 16-row tiles with K split among programs for a
    few tokens (the weight's bytes bound the time, so many programs must stream it), 64- to 256-row
    tiles (wgmma) for more, `torch._int_mm` wherever it takes the shape, and with `wgmma` (Hopper)
    the Gluon kernel's tiles from 17 tokens on."""
    def tiles(*shapes, **fixed):
        return [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                     num_stages=stages, **fixed)
                for block_m, block_n, block_k, split, warps, stages in shapes]

    by_bound = {
        16: tiles((16, 64, 256, 1, 4, 4), (16, 64, 256, 4, 4, 4), (16, 128, 256, 2, 4, 3), (16, 32, 256, 4, 4, 4),
                  (16, 64, 128, 8, 4, 4)),
        64: tiles((16, 64, 256, 1, 4, 4), (16, 64, 256, 4, 4, 4), (64, 64, 256, 1, 4, 4), (64, 128, 128, 1, 4, 4),
                  (64, 128, 256, 2, 4, 3), (64, 64, 128, 4, 4, 4)),
        # two warpgroups a tile too: Triton waits for an int32-accumulating wgmma at once (it keeps only
        # float32 accumulations in flight), so a second warpgroup is what keeps the tensor cores busy
        256: tiles((64, 64, 256, 1, 4, 4), (64, 128, 128, 1, 4, 4), (64, 128, 128, 2, 4, 4), (64, 64, 256, 2, 4, 4),
                   (128, 64, 128, 1, 4, 4), (128, 128, 128, 1, 8, 3), (128, 128, 128, 2, 8, 3), (128, 64, 128, 1, 8, 4),
                   (128, 64, 256, 1, 8, 3)),
        1024: tiles((128, 128, 128, 1, 8, 3), (128, 128, 128, 1, 8, 4), (64, 128, 128, 1, 4, 4),
                    (128, 64, 128, 1, 4, 4), (128, 128, 128, 2, 8, 3), (64, 64, 256, 1, 4, 4)),
    }
    # the Gluon kernel keeps one wgmma in flight, so deep rings of one warpgroup's tiles pay off; K split
    # (each share's sums stored apart, added by the last) where the tiles are too few for the SMs
    wgmma_by_bound = {
        16: [],
        64: tiles((64, 64, 256, 1, 4, 6), (64, 64, 256, 2, 4, 6), (64, 64, 256, 4, 4, 6), (64, 128, 256, 2, 4, 4),
                  WGMMA=True),
        256: tiles((64, 32, 256, 1, 4, 6), (64, 64, 256, 1, 4, 6), (64, 64, 256, 2, 4, 6), (64, 128, 256, 1, 4, 4),
                   (64, 128, 256, 2, 4, 4), (128, 128, 128, 2, 8, 4), (128, 64, 256, 1, 8, 4),
                   (256, 128, 128, 1, 8, 4), (128, 256, 128, 1, 8, 4), WGMMA=True),
        1024: tiles((64, 128, 256, 1, 4, 4), (64, 128, 128, 1, 4, 6), (128, 128, 128, 1, 4, 3),
                    (128, 128, 128, 1, 4, 5), (128, 256, 128, 1, 8, 4), (256, 128, 128, 1, 8, 4), WGMMA=True),
    }
    bound = next((bound for bound in by_bound if m <= bound), None)
    chosen = by_bound[bound] if bound else tiles(  # more tokens: large tiles, and smaller ones for small N
        (128, 128, 128, 1, 8, 3), (128, 128, 128, 1, 8, 4), (128, 256, 128, 1, 8, 3), (256, 128, 128, 1, 8, 3),
        (64, 128, 128, 1, 4, 4), (128, 64, 128, 1, 4, 4))
    if wgmma:
        chosen = chosen + (wgmma_by_bound[bound] if bound else tiles(
            (128, 256, 128, 1, 8, 4), (256, 128, 128, 1, 8, 4), (128, 128, 128, 1, 8, 4), WGMMA=True))
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
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, ROW: tl.constexpr):
        """One row: its amax, scale = max(amax, 1e-12) / 127 and codes = clamp(round(x / scale)),
        with IEEE divisions (div_rn), as torch computes them."""
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, ROW)
        in_k = ks < K
        x = tl.load(x_ptr + row * stride_x + ks, mask=in_k, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 127.0)
        codes = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)), -127.0), 127.0)
        tl.store(q_ptr + row * K + ks, codes.to(tl.int8), mask=in_k)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _scale_and_store(sums, rows_m, in_m, cols_n, in_n, sa_ptr, sw_ptr, bias_ptr, y_ptr, N,
                         HAS_BIAS: tl.constexpr):
        """The epilogue, `reference`'s: y = sums * token scale * channel scale (+ bias) in float32,
        cast to y's dtype."""
        token = tl.load(sa_ptr + rows_m, mask=in_m, other=0.0)
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
                     STAGES: tl.constexpr):
        """A [BLOCK_M, BLOCK_N] tile of y over this program's share of K: int8 tiles of codes (x's
        [BLOCK_M, BLOCK_K], W's [BLOCK_K, BLOCK_N]; stride_wk is 1 but in the benchmark's layout
        probe) into an int32 accumulator on the tensor cores; split along K, the shares add into the
        int32 workspace and the last to arrive applies the epilogue and sets the workspace and its
        counter back to zero."""
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
    def _epilogue_kernel(sums_ptr, sa_ptr, sw_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The epilogue over int32 sums [M, N] that `torch._int_mm` wrote: one read, one write."""
        rows_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rows_m < M, cols_n < N
        sums = tl.load(sums_ptr + rows_m[:, None] * N + cols_n[None, :], mask=in_m[:, None] & in_n[None, :], other=0)
        _scale_and_store(sums, rows_m, in_m, cols_n, in_n, sa_ptr, sw_ptr, bias_ptr, y_ptr, N, HAS_BIAS)

"""y = x @ W^T for quantized weights: uniform 4/8-bit grids per group, or look-up tables
(SqueezeLLM) with optional sparse outliers.

The weight comes as a `KernelWeight`: codes packed along K into int32 words [N, K * bits / 32]
(code i of a word at bits [bits*i, bits*(i+1)), qtool's canonical packing), and either
- scales [N, G] and integer zero points [N, G] (None: symmetric, zero 2**(bits-1)):
  W[n, k] = (q - z[n, g]) * s[n, g], g = k // group_size (-1: one group per row); or
- a table lut [N, G, L]: W[n, k] = lut[n, g, q];
plus, optionally, sparse outliers in CSR form (values, columns, row offsets) added to W.

Three things, as every kernel here:
- `reference`: the plain-torch definition (W dequantized in float32 and rounded to the
  activations' dtype; products accumulated in float32; outliers added to W before rounding);
  it runs anywhere.
- `triton_matmul`: one Triton kernel for every M. Each program computes a [BLOCK_M, BLOCK_N]
  tile of y over its share of K (split-K: the programs along K add their partial sums atomically
  into a float32 buffer), unpacking [BLOCK_N, BLOCK_K] codes from their words in registers,
  applying scales and zeros or looking the codes up in the rows' tables (`tl.gather`), and
  multiplying on the tensor cores (`tl.dot`; a few tokens are padded to the 16 rows a dot
  needs: the kernel is bound by reading the weights there anyway). The program that owns the
  first share of K also adds its rows' outliers. Block shapes and the split are chosen per
  shape by timing candidates once on the device (`_Tuner`).
- `quant_matmul`: the dispatcher: the kernel on CUDA for 4/8-bit codes and power-of-two groups,
  dequantize-then-cuBLAS for very many tokens, the reference elsewhere or when
  QTOOL_KERNELS=reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, or a stripped install): the reference path serves
    triton = None

KERNEL_BITS = (4, 8)
DEQUANTIZE_FROM_TOKENS = 4096  # from here on, dequantizing once and calling cuBLAS is as fast


@dataclass
class KernelWeight:
    """A quantized weight laid out for the kernel: K-major, so that a tile of codes, scales or
    table entries is read along N, the dimension consecutive threads cover.

    packed: int32 [ceil(K * bits / 32), N], the canonical words transposed (word j of column n
    holds that row's codes of inputs [j * 32/bits, (j + 1) * 32/bits)). scales [G, N] and zeros
    [G, N] (uniform grids; zeros None when symmetric), or lut [G, L, N] (tables of L entries).
    Outliers stay in CSR by output row n. `from_rows` takes qtool's row-major tensors."""

    packed: torch.Tensor
    bits: int
    in_features: int
    group_size: int
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    lut: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    outlier_columns: torch.Tensor | None = None
    outlier_row_offsets: torch.Tensor | None = None

    def __post_init__(self):
        self.max_row_outliers = 0
        if self.outlier_row_offsets is not None:
            self.max_row_outliers = int((self.outlier_row_offsets[1:] - self.outlier_row_offsets[:-1]).max())

    @classmethod
    def from_rows(cls, packed: torch.Tensor, bits: int, in_features: int, group_size: int,
                  scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, lut: torch.Tensor | None = None,
                  **outliers) -> "KernelWeight":
        """From row-major tensors: packed [N, words], scales / zeros [N, G], lut [N, G, L] (copies)."""
        def transposed(tensor):
            return None if tensor is None else tensor.t().contiguous()

        table = None if lut is None else lut.permute(1, 2, 0).contiguous()
        return cls(transposed(packed), bits, in_features, group_size, transposed(scales), transposed(zeros), table,
                   **outliers)

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    @property
    def groups(self) -> int:
        return (self.lut if self.lut is not None else self.scales).shape[0]

    def codes(self) -> torch.Tensor:
        """The codes [N, K] (int64)."""
        shifts = torch.arange(32 // self.bits, device=self.packed.device, dtype=torch.int32) * self.bits
        codes = (self.packed.t().unsqueeze(-1) >> shifts) & ((1 << self.bits) - 1)
        return codes.reshape(self.out_features, -1)[:, : self.in_features].long()

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in float32, outliers included."""
        codes = self.codes()
        size = self.in_features if self.group_size == -1 else self.group_size
        groups = torch.arange(self.in_features, device=codes.device) // size
        if self.lut is not None:
            weight = self.lut.float()[groups, codes, torch.arange(self.out_features, device=codes.device)[:, None]]
        else:
            zero = (2 ** (self.bits - 1)) if self.zeros is None else self.zeros.t()[:, groups]
            weight = (codes - zero).float() * self.scales.t().float()[:, groups]
        if self.outlier_values is not None:
            counts = (self.outlier_row_offsets[1:] - self.outlier_row_offsets[:-1]).long()
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=codes.device), counts)
            weight.index_put_((rows, self.outlier_columns.long()), self.outlier_values.float(), accumulate=True)
        return weight


def reference(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """What the kernel computes: W rounded to x's dtype, products summed in float32, y in x's dtype."""
    rounded = weight.dequantize().to(x.dtype)
    return (x.float() @ rounded.float().t()).to(x.dtype)


def quant_matmul(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N], by the fastest path this device and weight allow."""
    rows = x.reshape(-1, weight.in_features)
    if not kernel_fits(x, weight) or rows.shape[0] >= DEQUANTIZE_FROM_TOKENS:
        return F.linear(x, weight.dequantize().to(x.dtype))
    return triton_matmul(rows, weight).reshape(*x.shape[:-1], weight.out_features)


def kernel_fits(x: torch.Tensor, weight: KernelWeight) -> bool:
    """Whether the Triton kernel runs this product: on CUDA, fp16/bf16 activations, 4 or 8-bit
    codes, one group per row or a power-of-two group of at least 16 columns."""
    group = weight.group_size
    return (
        triton is not None and x.is_cuda and os.environ.get("QTOOL_KERNELS") != "reference"
        and x.dtype in (torch.float16, torch.bfloat16) and weight.bits in KERNEL_BITS
        and (group == -1 or (group >= 16 and group & (group - 1) == 0))
    )


def m_bucket(m: int) -> int:
    """Token counts that share a tuned configuration: 1, 2-4, 5-16, 17-64, 65-256, more."""
    return next(bound for bound in (1, 4, 16, 64, 256, 1 << 30) if m <= bound)


def triton_matmul(x: torch.Tensor, weight: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype through the Triton kernel. `config` fixes BLOCK_M,
    BLOCK_N, BLOCK_K, SPLIT_K (and num_warps / num_stages on a GPU) instead of the tuned choice:
    tests under TRITON_INTERPRET=1 use it."""
    x = x.contiguous()
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    lut = weight.lut
    dummy = weight.packed
    args = (x, weight.packed, weight.scales if lut is None else dummy, dummy if weight.zeros is None else weight.zeros,
            dummy if lut is None else lut,
            *(dummy if weight.outlier_values is None else tensor
              for tensor in (weight.outlier_values, weight.outlier_columns, weight.outlier_row_offsets)))
    sizes = dict(M=m, N=n, K=k, GROUPS=weight.groups, MAX_ROW_OUTLIERS=weight.max_row_outliers)
    meta = dict(BITS=weight.bits, GROUP=triton.next_power_of_2(k) if weight.group_size == -1 else weight.group_size,
                HAS_ZEROS=weight.zeros is not None, HAS_LUT=lut is not None,
                LUT_SIZE=1 if lut is None else lut.shape[1], HAS_OUTLIERS=weight.outlier_values is not None)

    def launch(chosen: dict) -> torch.Tensor:
        split = chosen.get("SPLIT_K", 1)
        if split > 1:
            out = torch.zeros(m, n, device=x.device, dtype=torch.float32)
        else:
            out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(n, chosen["BLOCK_N"]), triton.cdiv(m, chosen["BLOCK_M"]), split)
        blocks = {key: chosen[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        launch_options = {key: value for key, value in chosen.items() if key in ("num_warps", "num_stages")}
        _kernel[grid](*args, out, **sizes, **meta, **blocks, SPLIT_K=split, **launch_options)
        return out.to(x.dtype)

    if config is not None:
        return launch(config)
    key = (m_bucket(m), n, k, x.dtype, *meta.values())
    return launch(_TUNER.choose(key, launch, meta["GROUP"], m))


class _Tuner:
    """The fastest candidate configuration per key, timed once on the device (median of
    `triton.testing.do_bench`) the first time the key is seen, and kept for the process."""

    def __init__(self):
        self.best: dict[tuple, dict] = {}

    def choose(self, key: tuple, launch, group: int, m: int) -> dict:
        if key not in self.best:
            candidates = [c for c in CANDIDATES if (c["BLOCK_M"] == 1) == (m == 1) and c["BLOCK_M"] <= max(16, 2 * m)
                          and (group >= c["BLOCK_K"] or c["BLOCK_K"] % group == 0)]
            timings = {}
            for index, candidate in enumerate(candidates):
                try:
                    timings[index] = triton.testing.do_bench(lambda: launch(candidate), warmup=5, rep=20,
                                                             return_mode="median")
                except triton.runtime.errors.OutOfResources:
                    continue
            self.best[key] = candidates[min(timings, key=timings.get)]
        return self.best[key]


_TUNER = _Tuner()
CANDIDATES = [
    dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps, num_stages=stages)
    for block_m, block_n, block_k, split, warps, stages in (
        # one token: products on the CUDA cores; many programs, K split among them, so the weights
        # stream at full bandwidth
        (1, 128, 64, 1, 4, 4), (1, 128, 64, 4, 4, 4), (1, 64, 128, 4, 4, 4), (1, 256, 32, 4, 4, 4),
        (1, 128, 128, 2, 8, 3), (1, 128, 128, 8, 8, 3), (1, 256, 64, 4, 8, 3), (1, 64, 128, 8, 4, 4),
        # a few tokens: a 16-row dot, K split
        (16, 64, 128, 1, 4, 4), (16, 64, 128, 4, 4, 4), (16, 128, 128, 2, 4, 4), (16, 128, 64, 4, 4, 4),
        (16, 64, 256, 2, 4, 3), (16, 256, 64, 2, 8, 3), (16, 32, 256, 4, 4, 3),
        # many tokens: large tiles for the tensor cores
        (32, 128, 128, 1, 4, 4), (64, 128, 64, 1, 4, 4), (64, 128, 128, 1, 8, 3), (64, 256, 64, 1, 8, 3),
        (128, 128, 64, 1, 8, 4), (128, 256, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3),
    )
]


if triton is not None:

    @triton.jit
    def _kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, ov_ptr, oc_ptr, oo_ptr, y_ptr,
                M, N, K, GROUPS, MAX_ROW_OUTLIERS,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr,
                LUT_SIZE: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS_PER_TILE: tl.constexpr = BLOCK_K // PER_WORD
        # groups a tile spans: one when the group is at least the tile (the tile lies inside it)
        TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP if GROUP < BLOCK_K else 1
        SPAN: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
        WORDS = tl.cdiv(K, PER_WORD)
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rows_m < M, cols_n < N
        shifts = tl.arange(0, PER_WORD) * BITS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows_m[:, None] * K + ks[None, :], mask=in_m[:, None] & (ks < K)[None, :], other=0.0)
            word_rows = start // PER_WORD + tl.arange(0, WORDS_PER_TILE)
            words = tl.load(w_ptr + word_rows[:, None] * N + cols_n[None, :],
                            mask=(word_rows < WORDS)[:, None] & in_n[None, :], other=0)
            codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [words, per word, N]
            codes = tl.reshape(codes, (TILE_GROUPS, SPAN, BLOCK_N))
            group = start // GROUP + tl.arange(0, TILE_GROUPS)
            mask = (group < GROUPS)[:, None] & in_n[None, :]
            if HAS_LUT:
                entries = tl.arange(0, LUT_SIZE)
                table = tl.load(lut_ptr + ((group[:, None] * LUT_SIZE + entries[None, :]) * N)[:, :, None]
                                + cols_n[None, None, :], mask=mask[:, None, :], other=0.0)
                weight = tl.gather(table, codes, axis=1).to(tl.float32)
            else:
                scale = tl.load(s_ptr + group[:, None] * N + cols_n[None, :], mask=mask, other=0.0)
                if HAS_ZEROS:
                    zero = tl.load(z_ptr + group[:, None] * N + cols_n[None, :], mask=mask, other=0)
                else:
                    zero = tl.full((TILE_GROUPS, BLOCK_N), 1 << (BITS - 1), tl.int32)
                weight = (codes - zero[:, None, :]).to(tl.float32) * scale[:, None, :].to(tl.float32)
            weight = tl.reshape(weight, (BLOCK_K, BLOCK_N)).to(x.dtype)
            if BLOCK_M == 1:  # one token: products on the CUDA cores, no padding to a 16-row dot
                acc += tl.sum(weight.to(tl.float32) * tl.reshape(x, (BLOCK_K, 1)).to(tl.float32), axis=0)[None, :]
            else:
                acc = tl.dot(x, weight, acc)
        if HAS_OUTLIERS:
            if pid_k == 0:  # each row's outliers, added once: sum_j x[m, column_j] * value_j
                first = tl.load(oo_ptr + cols_n, mask=in_n, other=0)
                count = tl.load(oo_ptr + cols_n + 1, mask=in_n, other=0) - first
                for j in range(0, MAX_ROW_OUTLIERS):
                    present = in_n & (j < count)
                    column = tl.load(oc_ptr + first + j, mask=present, other=0)
                    value = tl.load(ov_ptr + first + j, mask=present, other=0.0).to(x_ptr.dtype.element_ty)
                    xs = tl.load(x_ptr + rows_m[:, None] * K + column[None, :], mask=in_m[:, None] & present[None, :],
                                 other=0.0)
                    acc += xs.to(tl.float32) * value.to(tl.float32)[None, :]
        out = y_ptr + rows_m[:, None] * N + cols_n[None, :]
        mask = in_m[:, None] & in_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)

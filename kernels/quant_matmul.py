"""y = x @ W^T for quantized weights: uniform 4/8-bit grids per group, or look-up tables
(SqueezeLLM) with optional sparse outliers.

The weight comes as a `KernelWeight`: codes packed along K into int32 words (code i of a word at
bits [bits*i, bits*(i+1)), qtool's canonical packing), and either
- scales [G, N] and integer zero points [G, N] (None: symmetric, zero 2**(bits-1)):
  W[n, k] = (q - z[g, n]) * s[g, n], g = k // group_size (-1: one group per row); or
- a table lut [G, L, N]: W[n, k] = lut[g, q, n];
plus, optionally, sparse outliers in CSR form (values, columns, row offsets) added to W.

Three things, as every kernel here:
- `reference`: the plain-torch definition (W dequantized in float32 and rounded to the
  activations' dtype; products accumulated in float32; outliers added to W before rounding);
  it runs anywhere.
- `triton_matmul`: a [BLOCK_M, BLOCK_N] tile of y a program, over its shares of K. A tile of
  words [BLOCK_K / per word, BLOCK_N] is loaded once (16-byte loads along N, software-pipelined
  through shared memory). One token multiplies on the CUDA cores, code position by position
  (code j of every word, taken out with a shift and a mask, is a [BLOCK_K / per word, BLOCK_N]
  tile of weights for the inputs k = per word * row + j: no reshape; it lands in an fp32
  mantissa as 1 + q / 2**bits, so there is no int-to-float conversion, and the scale and zero
  apply once per word); with fp16 activations and a uniform grid or one table per row, a second
  kernel does it in half2 arithmetic, two codes an instruction (`half2_dot_ptx`,
  `half2_table_dot_ptx`). More tokens dequantize the tile exactly to the activations' dtype (codes
  [rows, per word, N] merged into K) and multiply on the tensor cores (`tl.dot`; up to 64 tokens
  as y^T = W x^T, the weights the first operand; on Hopper, for 4-bit grids and 3 or more tokens,
  also Gluon kernels whose operands arrive by TMA: `qtool.kernels.w4_wgmma`'s (up to 256 tokens),
  and `qtool.kernels.w4_fragments`' from a second copy of the codes laid out as the wgmma's register
  fragments). K is split among many programs so that every multiprocessor streams weights; they
  add into a float32 workspace and the last to arrive writes y (one launch; no zeroing, no cast), or, for a caller
  that asks (`sums`: the runtime's model, up to PENDING_TOKENS tokens), into the caller's float32
  accumulator, leaving the product pending for the kernel that reads it (`qtool.kernels.pending`:
  no arrival count, no last program). Many tokens may
  instead dequantize W once (a Triton kernel) and call cuBLAS. Block shapes, the split and the
  path are chosen per shape by timing candidates once on the device, and the choices kept on disk
  for later processes (`_Tuner`).
- `quant_matmul`: the dispatcher: the kernel on CUDA for 4/8-bit codes and power-of-two groups,
  the reference elsewhere or when QTOOL_KERNELS=reference.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qtool.cache import cache_dir
from qtool.kernels import gluon_hopper, w4_fragments, w4_wgmma
from qtool.kernels.dependent_launch import dependent_launch
from qtool.kernels.dispatch import triton_runs
from qtool.kernels.pending import PendingSum

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, or a stripped install): the reference path serves
    triton = None

KERNEL_BITS = (4, 8)


def code_slots(bits: int) -> list[int]:
    """Where code j of a word sits in the kernel's layout, in units of `bits`: the codes of inputs
    2i and 2i + 1 sit half a word apart (slots i and i + per word / 2), so that one mask takes both
    into the two halves of a half2 (`_half2_dot`)."""
    per_word = 32 // bits
    return [(j >> 1) + (j & 1) * (per_word // 2) for j in range(per_word)]


def _to_slots(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical words (code j at slot j) with their codes moved to `code_slots`."""
    wide = words.long() & 0xFFFFFFFF
    moved = torch.zeros_like(wide)
    mask = (1 << bits) - 1
    for j, slot in enumerate(code_slots(bits)):
        moved |= ((wide >> (bits * j)) & mask) << (bits * slot)
    return torch.where(moved >= 2**31, moved - 2**32, moved).to(torch.int32)


@dataclass
class KernelWeight:
    """A quantized weight laid out for the kernel: K-major, so that a tile of codes, scales or
    table entries is read along N, the dimension consecutive threads cover.

    packed: int32 [ceil(K * bits / 32), N], the canonical words transposed (word j of column n
    holds that row's codes of inputs [j * 32/bits, (j + 1) * 32/bits)), each word's codes moved to
    `code_slots` (a copy made at load time, no larger than the checkpoint's). scales [G, N] and zeros
    [G, N] as bytes (uniform grids; zeros None when symmetric), or lut [G, L, N] (tables of L
    entries). Outliers stay in CSR by output row n. `from_rows` takes qtool's row-major tensors."""

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
    fragments: torch.Tensor | None = None  # the codes again, as wgmma fragments (`with_fragments`)

    def __post_init__(self):
        # what the launch path works out for this weight once (its tuned configurations, its TMA
        # descriptors): eager launches (a prefill's) otherwise spent more host time than GPU time
        self._remembered = {}
        self.max_row_outliers = 0
        self.outlier_rows = None
        if self.outlier_row_offsets is not None:
            counts = (self.outlier_row_offsets[1:] - self.outlier_row_offsets[:-1]).long()
            self.max_row_outliers = int(counts.max())
            self.outlier_rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)

    @classmethod
    def from_rows(cls, packed: torch.Tensor, bits: int, in_features: int, group_size: int,
                  scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, lut: torch.Tensor | None = None,
                  **outliers) -> "KernelWeight":
        """From row-major tensors: packed [N, words], scales / zeros [N, G], lut [N, G, L] (copies)."""
        def transposed(tensor):
            return None if tensor is None else tensor.t().contiguous()

        table = None if lut is None else lut.permute(1, 2, 0).contiguous()
        zero_bytes = None if zeros is None else transposed(zeros).to(torch.uint8)  # codes of at most 8 bits
        return cls(_to_slots(transposed(packed), bits), bits, in_features, group_size, transposed(scales), zero_bytes,
                   table, **outliers)

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    def remembered(self, key, make):
        """make(), the first time `key` is asked of this weight; the same object after (a copy of the
        weight, or one made by `replace`, starts afresh)."""
        if key not in self._remembered:
            self._remembered[key] = make()
        return self._remembered[key]

    @property
    def groups(self) -> int:
        return (self.lut if self.lut is not None else self.scales).shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = ((field.name, getattr(self, field.name)) for field in fields(self))
        return {name: value for name, value in named if isinstance(value, torch.Tensor)}

    @property
    def nbytes(self) -> int:
        """The bytes a product reads of the weight (its codes in one layout)."""
        read = (tensor for name, tensor in self._tensors().items() if name != "fragments")
        return sum(tensor.numel() * tensor.element_size() for tensor in read)

    def copy(self) -> "KernelWeight":
        """The same weight in new memory."""
        return replace(self, **{name: tensor.clone() for name, tensor in self._tensors().items()})

    def codes(self, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The codes [N, K] in `dtype`."""
        shifts = torch.tensor(code_slots(self.bits), device=self.packed.device, dtype=torch.int32) * self.bits
        codes = (self.packed.t().unsqueeze(-1) >> shifts) & ((1 << self.bits) - 1)
        return codes.reshape(self.out_features, -1)[:, : self.in_features].to(dtype)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in float32, outliers included."""
        codes = self.codes()
        size = self.in_features if self.group_size == -1 else self.group_size
        groups = torch.arange(self.in_features, device=codes.device) // size
        if self.lut is not None:
            weight = self.lut.float()[groups, codes, torch.arange(self.out_features, device=codes.device)[:, None]]
        else:
            zero = (2 ** (self.bits - 1)) if self.zeros is None else self.zeros.t()[:, groups].long()
            weight = (codes - zero).float() * self.scales.t().float()[:, groups]
        if self.outlier_values is not None:
            weight.index_put_((self.outlier_rows, self.outlier_columns.long()), self.outlier_values.float(),
                              accumulate=True)
        return weight


def with_fragments(weight: KernelWeight, dtype: torch.dtype) -> KernelWeight:
    """The weight with its codes also laid out as the wgmma's register fragments, for products of
    3 or more tokens by activations of `dtype` (`qtool.kernels.w4_fragments`), where that kernel runs:
    on Hopper (compute capability 9.x) with Gluon, for a weight and dtype it fits. A second copy of
    the codes, N * K / 2 bytes (3.5 GB for Llama-3-8B's linears)."""
    if not (gluon_hopper.runs_on(weight.packed.device) and w4_fragments.fits(weight, dtype)):
        return weight
    return replace(weight, fragments=w4_fragments.fragment_words(weight.codes(torch.uint8)))


def reference(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """What the kernel computes: W rounded to x's dtype, products summed in float32, y in x's dtype."""
    rounded = weight.dequantize().to(x.dtype)
    return (x.float() @ rounded.float().t()).to(x.dtype)


def quant_matmul(x: torch.Tensor, weight: KernelWeight, sums: torch.Tensor | None = None
                 ) -> torch.Tensor | PendingSum:
    """x [..., K] @ W^T -> [..., N], by the fastest path this device and weight allow. `sums`: a
    float32 accumulator of at least [tokens, N], all zero, that the caller keeps: the kernel adds
    into it and leaves the product pending for the kernel that reads it (`qtool.kernels.pending`),
    where the kernel runs it and the tokens are few enough (`pends`)."""
    if not kernel_fits(x, weight):
        return F.linear(x, weight.dequantize().to(x.dtype))
    rows = x.reshape(-1, weight.in_features)
    out = triton_matmul(rows, weight, sums=sums if sums is not None and pends(rows.shape[0]) else None)
    return out.view(*x.shape[:-1], weight.out_features)


PENDING_TOKENS = 64  # products of up to this many tokens may be left pending: their kernels split K


def pends(tokens: int) -> bool:
    """Whether a product of `tokens` tokens may be left pending (a caller sizes its accumulator by it)."""
    return tokens <= PENDING_TOKENS


def kernel_fits(x: torch.Tensor, weight: KernelWeight) -> bool:
    """Whether the Triton kernel runs this product: on CUDA, fp16/bf16 activations, 4 or 8-bit
    codes, one group per row or a power-of-two group of at least 16 columns."""
    group = weight.group_size
    return (
        triton_runs(x) and x.dtype in (torch.float16, torch.bfloat16) and weight.bits in KERNEL_BITS
        and (group == -1 or (group >= 16 and group & (group - 1) == 0))
    )


def m_bucket(m: int) -> int:
    """Token counts that share a tuned configuration: those of one power of two (2, 3-4, 5-8, ...).
    The tuner times a bucket at the first count it meets, so a bucket spans no more than a factor of
    two: a bucket of 2-4 tokens timed at 2 kept the one-token kernel, 0.9x of fp16 at 4 tokens."""
    return 1 << (m - 1).bit_length()


def triton_matmul(x: torch.Tensor, weight: KernelWeight, config: dict | None = None,
                  sums: torch.Tensor | None = None) -> torch.Tensor | PendingSum:
    """x [M, K] @ W^T -> [M, N] in x's dtype through the Triton kernels; with `sums` (zero,
    float32, at least [M, N]), the product added into them and left pending. `config` fixes BLOCK_M,
    BLOCK_N, BLOCK_K, SPLIT_K (0: one program per BLOCK_K rows of K), or DEQUANTIZE, or WGMMA (BLOCK_M,
    BLOCK_N, SPLIT_K: `w4_wgmma`'s kernel, on Hopper; with FRAGMENTS, `w4_fragments`', for a weight
    that has its fragment words), and
    num_warps / num_stages on a GPU, instead of the tuned choice: tests under TRITON_INTERPRET=1
    use it."""
    x = x.contiguous()
    if sums is not None:
        sums = sums.view(-1)[: x.shape[0] * weight.out_features].view(x.shape[0], weight.out_features)
    if config is None:
        config = weight.remembered(("tuned", m_bucket(x.shape[0]), x.dtype, sums is not None),
                                   lambda: _tuned(x, weight, sums is not None))
    return _launch(x, weight, config, sums)


def _tuned(x: torch.Tensor, weight: KernelWeight, pending: bool) -> dict:
    """The tuner's configuration for this product (timed the first time its key is seen)."""
    key = (m_bucket(x.shape[0]), weight.out_features, weight.in_features, x.dtype, weight.outlier_values is not None,
           weight.fragments is not None, pending, None if weight.scales is None else weight.scales.dtype,
           *_meta(weight).values())
    return _TUNER.choose(key, lambda: _timed_products(x, weight, pending), candidates(x.shape[0], weight, x.dtype))


def _timed_products(x: torch.Tensor, weight: KernelWeight, pending: bool) -> list:
    """What the tuner times for each configuration: the product over copies of the weight; pending
    ones into scratch sums (their reader's finishing costs every configuration the same)."""
    sums = torch.empty(x.shape[0], weight.out_features, device=x.device) if pending else None
    return [functools.partial(_launch, x, copy, sums=sums) for copy in copies_past_l2(weight)]


def copies_past_l2(weight):
    """The weight (on CUDA, with `nbytes` and `copy()`), and copies of it until they fill the L2
    cache three times over (`copies_to_fill_l2`): launched one after another, each product reads its
    weight from memory, as each layer does in a model's step. On a device too full for them, the
    copies that fit."""
    copies = [weight]
    for _ in range(copies_to_fill_l2(weight.nbytes) - 1):
        try:
            copies.append(weight.copy())
        except torch.cuda.OutOfMemoryError:
            break
    return copies


def copies_to_fill_l2(nbytes: int) -> int:
    """How many operands of `nbytes` fill the current device's L2 cache three times over (at least
    1, at most 64): what the tuner and the benchmarks time back to back."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(64, -(-3 * l2 // max(nbytes, 1))))


ONE_GROUP = 1 << 30  # the group of a weight with one group a row: wider than any K, the same for every K


def _meta(weight: KernelWeight) -> dict:
    """The kernels' compile-time description of a weight (one group a row as ONE_GROUP, so that its
    kernels compile once for layers of every width)."""
    group = ONE_GROUP if weight.group_size == -1 else weight.group_size
    return dict(BITS=weight.bits, GROUP=group, HAS_ZEROS=weight.zeros is not None, HAS_LUT=weight.lut is not None,
                LUT_SIZE=1 if weight.lut is None else weight.lut.shape[1])


def _launch(x: torch.Tensor, weight: KernelWeight, config: dict, sums: torch.Tensor | None = None
            ) -> torch.Tensor | PendingSum:
    """One product by the configuration's path: dequantize-then-cuBLAS, a Gluon kernel (WGMMA:
    `w4_wgmma`'s, or with FRAGMENTS `w4_fragments`'), or the matmul kernel (or the half2 kernel of one
    or two tokens a program row) on a grid of N tiles x M tiles x shares of K.
    HALF2: half2 arithmetic, for BLOCK_M 1 or 2 tokens in its own kernel, for tiles of tokens in the
    weights the matmul kernel's dot takes.
    SWAP: the dot computes y^T = W x^T, so the weights are its first operand (on Hopper that one
    may come from registers) and a few tokens fill its columns.
    With `sums` [M, N], every program adds its share into them, and the product is left pending."""
    if config.get("DEQUANTIZE"):
        if sums is not None:
            raise ValueError("dequantize-then-cuBLAS leaves no product pending")
        return x @ dequantize_t(weight, x.dtype, config)
    if config.get("WGMMA"):
        return _launch_gluon_w4(x, weight, config, sums)
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    meta = _meta(weight)
    half2 = config.get("HALF2", False)
    cuda_core_half2 = half2 and config["BLOCK_M"] <= 2  # one or two tokens a program row
    if half2 and not (half2_fits if cuda_core_half2 else half2_tiles_fit)(weight, x.dtype):
        raise ValueError("the half2 paths take fp16 activations and a uniform grid (the dot's with fp16 scales) or "
                         "one table of 4-bit codes per row")
    asm = os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter runs no PTX
    block_k = min(config["BLOCK_K"], meta["GROUP"]) if cuda_core_half2 else config["BLOCK_K"]
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]),
            config["SPLIT_K"] or triton.cdiv(k, block_k))
    split = grid[2] > 1 and sums is None
    out, workspace, arrivals = _outputs(x, n, grid, sums)
    outliers = [weight.packed if tensor is None else tensor  # (unread when absent)
                for tensor in (weight.outlier_values, weight.outlier_columns, weight.outlier_row_offsets)]
    common = dict(SPLIT=split, PENDING=sums is not None, EVEN_N=_even(n, k, config)["EVEN_N"],
                  BLOCK_N=config["BLOCK_N"], BLOCK_K=block_k, HAS_OUTLIERS=weight.outlier_values is not None, ASM=asm,
                  **meta, **_launch_options(config), **dependent_launch(x.device))
    if cuda_core_half2:
        _half2_kernel[grid](x, *_weight_args(weight), *outliers, out, workspace, arrivals, m, n, k,
                            weight.max_row_outliers, EVEN_K=k % block_k == 0, TOKENS=config["BLOCK_M"],
                            STAGES=config.get("num_stages", 1), **common)
    else:
        _matmul_kernel[grid](
            x, *_weight_args(weight), *outliers, out, workspace, arrivals, m, n, k, weight.groups,
            weight.max_row_outliers, EVEN_K=_even(n, k, config)["EVEN_K"], BLOCK_M=config["BLOCK_M"],
            STAGES=config.get("num_stages", 1), HALF2=half2, SWAP=config.get("SWAP", False), **common)
    return out if sums is None else PendingSum(sums, x.dtype)


def _launch_gluon_w4(x: torch.Tensor, weight: KernelWeight, config: dict, sums: torch.Tensor | None
                     ) -> torch.Tensor | PendingSum:
    """The product by a Gluon kernel (`w4_wgmma`'s, or with FRAGMENTS `w4_fragments`'), on a grid of M
    tiles x N tiles x shares of K."""
    kernel = w4_fragments if config.get("FRAGMENTS") else w4_wgmma
    if not kernel.takes(weight, x.dtype):
        raise ValueError("the W4 wgmma kernels take fp16 activations and 4-bit uniform grids (fp16 scales, byte zero "
                         "points, no outliers), groups of a power of two >= 64 (or one a row), N a multiple of 16 and "
                         "K of 8 (of 16 and a weight with its fragment words for FRAGMENTS), on compute capability 9.x")
    if x.data_ptr() % 16:
        x = x.clone()  # TMA reads rows from 16-byte aligned addresses
    n = weight.out_features
    out, workspace, arrivals = _outputs(x, n, w4_wgmma.grid(x.shape[0], n, weight.in_features, config), sums)
    kernel.launch(x, weight, config, _meta(weight)["GROUP"], out, workspace, arrivals, pending=sums is not None)
    return out if sums is None else PendingSum(sums, x.dtype)


def dequantize_t(weight: KernelWeight, dtype: torch.dtype, config: dict) -> torch.Tensor:
    """W^T [K, N] in `dtype` through the Triton dequantization kernel, outliers added."""
    n, k = weight.out_features, weight.in_features
    out = torch.empty(k, n, device=weight.packed.device, dtype=dtype)
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(k, config["BLOCK_K"]))
    _dequantize_kernel[grid](
        *_weight_args(weight), out, n, k, weight.groups, **_meta(weight), **_even(n, k, config),
        BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], **_launch_options(config))
    if weight.outlier_values is not None:  # each (input, output) once: a gather and a scatter, no sorting
        at = (weight.outlier_columns.long(), weight.outlier_rows)
        out[at] += weight.outlier_values.to(dtype)
    return out


def _outputs(x: torch.Tensor, n: int, grid: tuple, sums: torch.Tensor | None) -> tuple:
    """(y, the split's workspace, its arrival counts) of a product on `grid` (tiles of N and of M,
    in either order, then shares of K); with `sums`, the programs add into them (y, the workspace and
    counts unread)."""
    if sums is not None:
        return sums, sums, sums
    split = grid[2] > 1
    m = x.shape[0]
    return (torch.empty(m, n, device=x.device, dtype=x.dtype),
            *_workspace(x.device, m * n if split else 1, grid[0] * grid[1] if split else 1))


def _weight_args(weight: KernelWeight) -> tuple:
    dummy = weight.packed
    return tuple(dummy if tensor is None else tensor for tensor in (weight.packed, weight.scales, weight.zeros,
                                                                      weight.lut))


def _even(n: int, k: int, config: dict) -> dict:
    return dict(EVEN_N=n % config["BLOCK_N"] == 0, EVEN_K=k % config["BLOCK_K"] == 0)


def _launch_options(config: dict) -> dict:
    return {key: value for key, value in config.items() if key in ("num_warps", "num_stages")}


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept: CUDA graphs captured with them still use them


def _workspace(device: torch.device, size: int, tiles: int, use: str = "sums") -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial sums and per-tile arrival counts for split-K, one pair per device, stream and
    `use`. The "sums" pair is all zero between launches (the last program of each tile sets its part
    back to zero); any pair's counts are. A pair too small is replaced by one at least twice its size
    and kept (`_OUTGROWN`): a CUDA graph captured with it would otherwise write into freed memory; the
    doubling bounds what is kept to the size of the pair in use."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, use)
    held = _WORKSPACES.get(key)
    if held is None or held[0].numel() < size or held[1].numel() < tiles:
        if held is not None:
            _OUTGROWN.append(held)
        sizes = (size, tiles) if held is None else (max(size, 2 * held[0].numel()), max(tiles, 2 * held[1].numel()))
        held = _WORKSPACES[key] = (torch.zeros(sizes[0], device=device, dtype=torch.float32),
                                   torch.zeros(sizes[1], device=device, dtype=torch.int32))
    return held


class _Tuner:
    """The fastest candidate configuration per key, timed once on the device (median replay of a
    CUDA graph of launches over copies of the operands, as `launches` makes them) the first time the
    key is seen, and kept: for the process, and on disk, so that later processes skip the timing
    (`cache_dir()/tuning`, a file per kernel modules' sources, GPU and Triton version; a stored choice
    no longer among the candidates is timed again). `timings` keeps every candidate's time for the
    benchmarks' notes; they set `persist` False to time everything afresh."""

    def __init__(self, *sources: str):
        self.sources = [Path(source) for source in sources]  # the kernels' modules: their digest names the stored choices
        self.persist = True
        self.stored: dict[str, dict] | None = None  # repr(key) -> configuration, read at first use
        self.best: dict[tuple, dict] = {}
        self.timings: dict[tuple, list[tuple[float, dict]]] = {}
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def choose(self, key: tuple, launches, candidates: list[dict]) -> dict:
        """`launches()`: functions that each launch the product for a configuration, one per copy of
        its operands (called only when the key is timed)."""
        if self.best.get(key) not in candidates:  # unseen; or chosen among candidates this weight is not offered
            stored = self._stored().get(repr(key)) if self.persist else None
            if stored in candidates:
                self.best[key] = stored
                return stored
            timings = []
            copies = launches()
            for candidate in candidates:
                try:
                    milliseconds = self.milliseconds([functools.partial(launch, candidate) for launch in copies])
                except triton.runtime.errors.OutOfResources:
                    continue
                timings.append((milliseconds, candidate))
            self.timings[key] = sorted(timings, key=lambda timed: timed[0])
            self.best[key] = self.timings[key][0][1]
            if self.persist:
                self._store(repr(key), self.best[key])
        return self.best[key]

    @functools.cached_property
    def _path(self) -> Path:
        """Named once a process: the source's digest, the GPU and the Triton version do not change."""
        digest = hashlib.sha256(b"".join(source.read_bytes() for source in self.sources)).hexdigest()[:16]
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name())
        return cache_dir() / "tuning" / f"{self.sources[0].stem}-{gpu}-triton{triton.__version__}-{digest}.json"

    def _stored(self) -> dict[str, dict]:
        if self.stored is None:
            try:
                self.stored = json.loads(self._path.read_text())
            except (OSError, ValueError):  # none yet, or unreadable: time again
                self.stored = {}
        return self.stored

    def _store(self, key: str, config: dict) -> None:
        """Adds a choice to the file (written whole to a temporary name, then renamed: a reader sees the
        old file or the new one)."""
        self._stored()[key] = config
        path = self._path
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.stored, indent=1, sort_keys=True))
        temporary.replace(path)

    def milliseconds(self, calls) -> float:
        """Median time of one call in a CUDA graph of all `calls`, the L2 cache flushed before each
        replay: neither Python's launch overhead (longer than a one-token product) nor a warm cache
        counts. Launched back to back, as a model's step runs its products and as the benchmarks time
        them; a graph of one launch would also count the graph's own start."""
        device = torch.device("cuda", torch.cuda.current_device())
        stream = self.streams.setdefault(device, torch.cuda.Stream(device))
        with torch.cuda.stream(stream):
            calls[0]()  # compiles, and sizes this stream's workspace outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
        return triton.testing.do_bench(graph.replay, warmup=5, rep=20, return_mode="median") / len(calls)


# a change to any of the kernels' modules times the choices again
_TUNER = _Tuner(__file__, w4_wgmma.__file__, w4_fragments.__file__, gluon_hopper.__file__)


def half2_fits(weight: KernelWeight, dtype: torch.dtype) -> bool:
    """Whether the one-token half2 kernel takes this weight: fp16 activations, inputs in whole
    words, and a uniform grid or one table of 4-bit codes per row (outliers or not)."""
    whole_words = weight.in_features % (32 // weight.bits) == 0
    return dtype == torch.float16 and whole_words and (weight.lut is None or (weight.bits == 4 and weight.groups == 1))


def half2_tiles_fit(weight: KernelWeight, dtype: torch.dtype) -> bool:
    """Whether the dot's weights can be made in half2 arithmetic (a table's looked up by PRMT): what
    `half2_fits` asks, and for a uniform grid fp16 scales (an fp32 or bf16 scale rounded to fp16
    first would round the weight twice)."""
    return half2_fits(weight, dtype) and (weight.lut is not None or weight.scales.dtype == torch.float16)


def candidates(m: int, weight: KernelWeight, dtype: torch.dtype) -> list[dict]:
    """The configurations worth timing for m tokens: CUDA-core tiles of one token (in half2 where
    the weight allows), and for 2-4 tokens of two (in half2, the weights made once for both); up to
    64 tokens, dots with the operands swapped (y^T = W x^T, the tokens as the dot's columns; the
    weights made in half2 arithmetic where the weight allows); for more, dots of 64-128 tokens in
    float32 weights, swapped dots of 128-256 tokens, and dequantize-then-cuBLAS; for 3-256 tokens
    and a weight `w4_wgmma` takes, its tiles (`w4_wgmma_candidates`), and for 3 or more
    `w4_fragments`' where the weight has its fragment words (`fragments_candidates`). Tiles up to 64
    tokens are the fastest of sweeps on an H200 (benchmarks/results/kernels_h200.md). A dot needs 8 rows of words."""
    bits = weight.bits

    def tiles(*shapes, **form):
        return [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                     num_stages=stages, **form)
                for block_m, block_n, block_k, split, warps, stages in shapes
                if block_m == 1 or block_k * bits // 32 >= 8]

    one_float32 = tiles((1, 64, 256, 8, 4, 3), (1, 64, 256, 16, 4, 3), (1, 128, 256, 8, 4, 3), (1, 64, 512, 0, 4, 1),
                        (1, 128, 128, 16, 4, 4), (1, 256, 128, 8, 8, 3), (1, 64, 128, 32, 4, 3),
                        (1, 256, 128, 0, 4, 1), (1, 512, 64, 16, 4, 3), (1, 128, 256, 0, 4, 1))

    def cuda_core_half2(tokens, *shapes, stages=1):
        return [dict(BLOCK_M=tokens, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                     num_stages=stages, HALF2=True)
                for block_n, block_k, split, warps in shapes
                if half2_fits(weight, dtype) and block_k <= _meta(weight)["GROUP"]]

    one = cuda_core_half2(1, (256, 64, 8, 2), (512, 64, 8, 4), (128, 64, 8, 4), (128, 64, 8, 2), (256, 64, 32, 2),
                          (512, 64, 32, 4), (128, 64, 32, 2), (256, 64, 16, 4), (128, 64, 16, 4), (256, 128, 8, 4),
                          (256, 128, 4, 4), (512, 128, 4, 8),
                          (128, 64, 0, 2), (256, 64, 0, 2),  # split to one tile a program: small layers
                          # one warp: no scale rows shared between warps through shared memory (barriers)
                          (64, 64, 8, 1), (64, 64, 16, 1), (64, 64, 32, 1))
    # two tiles in flight through shared memory, where they hold no registers (168 -> 91 a thread at
    # 256 x 64, 2 warps, in the sm_90 build): more warps an SM, or 64 words a thread in the same registers
    one += cuda_core_half2(1, (256, 64, 8, 2), (256, 64, 16, 2), (256, 64, 32, 2), (128, 64, 16, 1), (128, 64, 32, 1),
                           (512, 64, 16, 4), (256, 64, 16, 1), (512, 64, 16, 2), (256, 128, 8, 2),
                           stages=3) + one_float32
    two = cuda_core_half2(2, (256, 64, 8, 2), (128, 64, 8, 2), (256, 64, 16, 4), (128, 64, 16, 4), (512, 64, 8, 4),
                          (128, 64, 32, 2))
    two += cuda_core_half2(2, (256, 64, 8, 2), (128, 64, 16, 1), stages=3)
    swapped = dict(SWAP=True, HALF2=half2_tiles_fit(weight, dtype))
    few = tiles((16, 64, 64, 8, 4, 3), (16, 64, 64, 4, 4, 3), (16, 64, 64, 16, 4, 3), (16, 64, 128, 8, 4, 3),
                (16, 128, 64, 16, 4, 3), (16, 128, 64, 8, 8, 3), **swapped)
    some = tiles((64, 64, 64, 4, 4, 3), (64, 64, 64, 8, 4, 3), (64, 64, 128, 4, 4, 3), (64, 64, 128, 8, 4, 2),
                 (64, 128, 64, 8, 8, 3), (32, 64, 64, 8, 4, 3), **swapped)
    many = tiles((64, 128, 128, 1, 4, 3), (128, 128, 128, 1, 8, 3), (128, 256, 128, 1, 8, 3),
                 (64, 256, 128, 1, 8, 3), (128, 128, 128, 2, 8, 3))
    # swapped, the tile's wgmma stays in flight while the next tile's weights are made (in the other
    # orientation the weights' shared-memory copy must be read before they are overwritten)
    many += tiles((128, 128, 64, 1, 8, 3), (256, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 3), (128, 128, 64, 2, 8, 3),
                  **swapped)
    dequantize = [dict(DEQUANTIZE=True, BLOCK_N=128, BLOCK_K=64, num_warps=4),
                  dict(DEQUANTIZE=True, BLOCK_N=256, BLOCK_K=128, num_warps=8)]
    by_bound = ((1, one), (4, two + one + few), (16, few), (64, some), (256, some + many + dequantize))
    chosen = next((chosen for bound, chosen in by_bound if m <= bound), many + dequantize)
    if 2 < m <= 256 and w4_wgmma.takes(weight, dtype):
        chosen = chosen + w4_wgmma_candidates(m)
    if 2 < m and w4_fragments.takes(weight, dtype):
        chosen = chosen + fragments_candidates(m)
    return chosen


def w4_wgmma_candidates(m: int) -> list[dict]:
    """Tiles of `w4_wgmma`'s kernel for m tokens: the tokens in one tile (16-64 of them; 128 up to
    256), outputs in tiles of 64 or 128, K split 1-16 ways, a ring of 3-4 steps: the fastest of
    sweeps on an H200 (benchmarks/results/kernels_h200.md, "Version 14")."""
    if m <= 64:
        block_m, shapes = max(16, m_bucket(m)), ((64, 8, 4), (64, 16, 4), (64, 4, 4), (128, 2, 4), (128, 4, 4))
    else:
        block_m, shapes = 128, ((64, 4, 4), (64, 2, 3), (64, 1, 4), (128, 2, 4))
    return [dict(WGMMA=True, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, num_warps=4, num_stages=stages)
            for block_n, split, stages in shapes]


def fragments_candidates(m: int) -> list[dict]:
    """Tiles of `w4_fragments`' kernel for m tokens: the tokens in one tile (8-64 of them; 128 past
    64, and past 128 also 256 in two warpgroups), outputs in tiles of 64 or 128, K split 1-16 ways, a
    ring of 4 steps (3 for 256 tokens; 6 for an unsplit K of up to 64 tokens): the fastest of sweeps
    on an H200 and an H100 (benchmarks/results/kernels_h200.md, "Version 15", "Version 16" and
    "Version 18"; 32 ways, and 256 outputs were never faster). Past 256 tokens the tiles are many
    already, and K is split at most twice."""
    fragments = dict(WGMMA=True, FRAGMENTS=True)
    if m <= 64:
        block_m = max(8, m_bucket(m))
        shapes = ((128, 1, 6), (64, 1, 6), (128, 2, 4), (128, 3, 4), (128, 4, 4), (128, 8, 4), (128, 16, 4),
                  (64, 4, 4), (64, 8, 4), (64, 16, 4))
    elif m <= 256:
        block_m, shapes = 128, ((128, 1, 4), (128, 2, 4), (128, 4, 4), (128, 8, 4), (64, 2, 4), (64, 4, 4))
    else:
        block_m, shapes = 128, ((128, 1, 4), (128, 2, 4), (64, 1, 4))
    tiles = [dict(fragments, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, num_warps=4, num_stages=stages)
             for block_n, split, stages in shapes]
    if m > 128:
        tiles += [dict(fragments, BLOCK_M=256, BLOCK_N=128, SPLIT_K=split, num_warps=8, num_stages=3)
                  for split in ((1, 2, 4) if m <= 256 else (1, 2))]
    return tiles


HALF2_EXPONENT = 0x4400  # fp16 4.0: a code q in the low mantissa bits reads 4 + q / 256
# fp16 0.25, whose unit in the last place is 16 times smaller: a 4-bit code q one nibble up (bits 4-7)
# reads 0.25 + 16 q / 4096 = 0.25 + q / 256, so the odd nibbles need no shift
HALF2_ODD_EXPONENT = 0x3400


def half2_dot_ptx(bits: int, tokens: int = 1) -> str:
    """PTX for one word of codes times the inputs of `tokens` tokens, in half2 arithmetic: the codes
    of each pair of inputs taken into the halves of a half2 as 4 + q / 256 (or 0.25 + q / 256 for a
    pair a nibble up) by one LOP3 (4 bits; one shift a byte) or PRMT (8 bits) under fp16's exponent;
    less the zero under the same exponent that is (q - z) / 256, exactly; times each token's inputs
    and summed in fp16 (the 1/256 keeps any fp16 input's sums finite), a sum per token returned as
    float32 bits for the caller to scale by 256 s. The weights are made once for all the tokens.
    Operands: the sums ($0, ...), the word, each token's input pairs as half2, then the zero as half2
    (4 + z / 256, twice); for 4 bits also the zero as 0.25 + z / 256 (twice)."""
    pairs = 16 // bits
    word = f"${tokens}"
    inputs = [[f"${tokens + 1 + token * pairs + i}" for i in range(pairs)] for token in range(tokens)]
    zeros = [f"${tokens + 1 + tokens * pairs + odd}" for odd in (0, 1)]
    sums = [f"acc{token}" for token in range(tokens)]
    exponents = (HALF2_EXPONENT * 0x10001, HALF2_ODD_EXPONENT * 0x10001)
    lines = ["{", f".reg .b32 w, t, {', '.join(sums)};", ".reg .b16 lo, hi, h;", ".reg .f32 f;"]
    for i in range(pairs):
        if bits == 4:  # slots i and i + 4: nibbles at bits 4i and 16 + 4i; a byte up by one shift
            if i == 2:
                lines.append(f"shr.u32 w, {word}, 8;")
            source, odd = (word if i < 2 else "w"), i % 2
            mask = 0x00F000F0 if odd else 0x000F000F
            lines.append(f"lop3.b32 t, {source}, {mask:#010x}, {exponents[odd]:#x}, 0xea;")  # (w & mask) | exponent
            zero = zeros[odd]
        else:  # slots i and i + 2: bytes i and i + 2, each under the exponent's byte
            lines.append(f"prmt.b32 t, {word}, {(HALF2_EXPONENT >> 8) * 0x1010101:#x}, {0x4040 | i | (i + 2) << 8:#x};")
            zero = zeros[0]
        lines.append(f"sub.rn.f16x2 t, t, {zero};")
        for acc, pair in zip(sums, (token_inputs[i] for token_inputs in inputs)):
            lines.append(f"mul.rn.f16x2 {acc}, t, {pair};" if i == 0 else f"fma.rn.f16x2 {acc}, t, {pair}, {acc};")
    for token, acc in enumerate(sums):
        lines += [f"mov.b32 {{lo, hi}}, {acc};", "add.rn.f16 h, lo, hi;", "cvt.f32.f16 f, h;", f"mov.b32 ${token}, f;"]
    return "\n".join(lines + ["}"])


def half2_weights_ptx(bits: int) -> str:
    """PTX for two weights from a word shifted right by `bits` x pair: the codes at bit 0 and bit 16
    (codes 2 pair and 2 pair + 1: `code_slots`) taken into the halves of a half2 as 1024 + q by one
    LOP3 (4 bits) or PRMT (8 bits) under fp16's exponent of 1024, less 1024 + z (exact), times the
    scale (one rounding, as the reference rounds (q - z) s). Operands: $0, $1 the two weights
    (fp16), $2 the shifted word, $3 the zero as half2 (1024 + z, twice), $4 the scale as half2."""
    if bits == 4:
        take = "lop3.b32 t, $2, 0x000f000f, 0x64006400, 0xea;"  # (word & mask) | exponent
    else:
        take = "prmt.b32 t, $2, 0x64646464, 0x4240;"  # bytes 0 and 2, each under the exponent's byte
    return "\n".join(["{", ".reg .b32 t;", take, "sub.rn.f16x2 t, t, $3;", "mul.rn.f16x2 t, t, $4;",
                      "mov.b32 {$0, $1}, t;", "}"])


def _table_lookup_ptx(entries: int, word: str, first_plane: int) -> list[str]:
    """PTX lines that look a word's eight 4-bit codes up in a table of `entries` (8 or 16) fp16
    values held in registers as byte planes (`_table_planes`: the low bytes of entries 4r..4r + 3 in
    one word, their high bytes in another; operands from $first_plane: the low planes, then the
    high ones), leaving the entries of inputs (0, 2), (1, 3), (4, 6), (5, 7) as half2 in p0-p3.
    PRMT takes four codes as byte selectors at once (a word's even slots, then its odd ones); codes
    of 8 and more select from the planes of entries 8-15 (PRMT reads a selector's top bit as
    "replicate the sign", so those codes' bit 3 is flipped first and a byte mask picks the right
    look-up)."""
    planes = entries // 4
    low = [f"${first_plane + r}" for r in range(planes)]
    high = [f"${first_plane + planes + r}" for r in range(planes)]
    lines = [".reg .b32 w, t, m, wb, a, b, lo, hi, p0, p1, p2, p3;"]
    for half, (first, second) in enumerate((("p0", "p2"), ("p1", "p3"))):  # even slots, then odd ones
        lines.append(f"mov.b32 w, {word};" if half == 0 else f"shr.u32 w, {word}, 16;")
        if entries == 16:
            lines += ["shr.u32 t, w, 1;", "and.b32 t, t, 0x4444;",
                      "prmt.b32 m, 0, 0xffffffff, t;",  # byte k all ones where code k is 8 or more
                      "xor.b32 wb, w, 0x8888;"]
        for plane, out in ((low, "lo"), (high, "hi")):
            if entries == 16:
                lines += [f"prmt.b32 a, {plane[0]}, {plane[1]}, w;", f"prmt.b32 b, {plane[2]}, {plane[3]}, wb;",
                          f"lop3.b32 {out}, a, b, m, 0xd8;"]  # m ? b : a
            else:
                lines.append(f"prmt.b32 {out}, {plane[0]}, {plane[1]}, w;")
        lines += [f"prmt.b32 {first}, lo, hi, 0x5140;", f"prmt.b32 {second}, lo, hi, 0x7362;"]
    return lines


def half2_table_dot_ptx(entries: int) -> str:
    """PTX for one word of 4-bit codes looked up in a table (`_table_lookup_ptx`) and times one
    token's inputs, in half2 arithmetic, summed in fp16 and returned as float32 bits. Operands: $1
    the word, $2-$5 the inputs (0, 2), (1, 3), (4, 6), (5, 7) as half2, then the planes."""
    return "\n".join(["{", ".reg .b32 acc;", ".reg .b16 l, h;", ".reg .f32 f;", *_table_lookup_ptx(entries, "$1", 6),
                      "mul.rn.f16x2 acc, p0, $2;", "fma.rn.f16x2 acc, p1, $3, acc;", "fma.rn.f16x2 acc, p2, $4, acc;",
                      "fma.rn.f16x2 acc, p3, $5, acc;", "mov.b32 {l, h}, acc;", "add.rn.f16 l, l, h;",
                      "cvt.f32.f16 f, l;", "mov.b32 $0, f;", "}"])


def half2_table_weights_ptx(entries: int) -> str:
    """PTX for the eight weights of one word of 4-bit codes looked up in a table
    (`_table_lookup_ptx`): $0-$7 the fp16 weights of inputs 0-7, $8 the word, then the planes."""
    return "\n".join(["{", *_table_lookup_ptx(entries, "$8", 9), "mov.b32 {$0, $2}, p0;", "mov.b32 {$1, $3}, p1;",
                      "mov.b32 {$4, $6}, p2;", "mov.b32 {$5, $7}, p3;", "}"])


if triton is not None:
    from qtool.kernels.dependent_launch import wait_for_previous

    _EXPONENT = tl.constexpr(HALF2_EXPONENT)
    _ODD_EXPONENT = tl.constexpr(HALF2_ODD_EXPONENT)
    _HALF2_DOT_4 = tl.constexpr(half2_dot_ptx(4))
    _HALF2_DOT_8 = tl.constexpr(half2_dot_ptx(8))
    _HALF2_DOT2_4 = tl.constexpr(half2_dot_ptx(4, tokens=2))
    _HALF2_DOT2_8 = tl.constexpr(half2_dot_ptx(8, tokens=2))
    _HALF2_WEIGHTS_4 = tl.constexpr(half2_weights_ptx(4))
    _HALF2_WEIGHTS_8 = tl.constexpr(half2_weights_ptx(8))
    _HALF2_TABLE_16 = tl.constexpr(half2_table_dot_ptx(16))
    _HALF2_TABLE_8 = tl.constexpr(half2_table_dot_ptx(8))
    _TABLE_WEIGHTS_16 = tl.constexpr(half2_table_weights_ptx(16))
    _TABLE_WEIGHTS_8 = tl.constexpr(half2_table_weights_ptx(8))

    @triton.jit
    def _below(index, bound, EVEN: tl.constexpr):
        """index < bound; all true when the shape divides evenly into tiles, so that the loads and
        stores go unmasked (fewer instructions)."""
        if EVEN:
            below = tl.full(index.shape, True, tl.int1)
        else:
            below = index < bound
        return below

    @triton.jit
    def _code(words, j: tl.constexpr, BITS: tl.constexpr):
        """Code j of each word (at slot j // 2 + (j % 2) * per word / 2: `code_slots`)."""
        SHIFT: tl.constexpr = BITS * ((j >> 1) + (j & 1) * (16 // BITS))
        return (words >> SHIFT) & ((1 << BITS) - 1)

    @triton.jit
    def _load_words(w_ptr, start, cols_n, in_n, N, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """The words of inputs [start, start + BLOCK_K) for columns cols_n [rows, BLOCK_N] (read once:
        evicted first), their word rows, and the mask of those present."""
        PER_WORD: tl.constexpr = 32 // BITS
        rows = start // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        mask = _below(rows, tl.cdiv(K, PER_WORD), EVEN_K)[:, None] & in_n[None, :]
        words = tl.load(w_ptr + rows[:, None] * N + cols_n[None, :], mask=mask, other=0, eviction_policy="evict_first")
        return words, rows, mask

    @triton.jit
    def _half2_load(row_ptr, second, w_ptr, s_ptr, z_ptr, start, cols_n, in_n, N, K, BITS: tl.constexpr,
                    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr, BLOCK_K: tl.constexpr,
                    TOKENS: tl.constexpr, EVEN_K: tl.constexpr):
        """What the products of TOKENS tokens (rows from row_ptr; the second `second` present) with
        inputs [start, start + BLOCK_K) (inside one group) read: the words [rows, BLOCK_N]; each
        token's inputs (`_input_pairs`; for one token the second's are the first's, unread); the scale
        (fp16) and the zero point (int32) [1, BLOCK_N] of a uniform grid (zeros for a table:
        `_table_planes`). Zero past K; with EVEN_K the caller never asks past K, and nothing is
        masked along K (a masked load costs an instruction a two registers, to zero them)."""
        PER_WORD: tl.constexpr = 32 // BITS
        words, rows, _ = _load_words(w_ptr, start, cols_n, in_n, N, K, BITS, BLOCK_K, EVEN_K)
        in_k = _below(rows, K // PER_WORD, EVEN_K)[:, None]
        x0, x1, x2, x3 = _input_pairs(row_ptr, rows, in_k, BITS)
        if TOKENS == 2:
            y0, y1, y2, y3 = _input_pairs(row_ptr + K, rows, in_k & second, BITS)
        else:
            y0, y1, y2, y3 = x0, x1, x2, x3
        present = in_n & _below(start + 0 * cols_n, K, EVEN_K)  # a tensor: the interpreter's masks take no bool
        group = start // GROUP
        if HAS_LUT:
            scale = tl.zeros((1, cols_n.shape[0]), tl.float16)
            zero = tl.zeros((1, cols_n.shape[0]), tl.int32)
        else:
            scale = tl.load(s_ptr + group * N + cols_n, mask=present, other=0.0)[None, :]
            if HAS_ZEROS:
                zero = tl.load(z_ptr + group * N + cols_n, mask=present, other=0).to(tl.int32)[None, :]
            else:
                zero = tl.full((1, cols_n.shape[0]), 1 << (BITS - 1), tl.int32)
        return words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero

    @triton.jit
    def _input_pairs(row_ptr, rows, in_k, BITS: tl.constexpr):
        """One token's inputs of word rows `rows` as int32 pairs of fp16, a column [rows, 1] per pair
        (8-bit words use two; the others repeat them and go unread); zero where in_k is not."""
        PAIRS: tl.constexpr = 16 // BITS
        pairs_ptr = row_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * PAIRS + tl.arange(0, PAIRS)[None, :]
        pairs = tl.load(pairs_ptr, mask=in_k, other=0)  # a word row's inputs in one vector load
        if BITS == 4:
            even, odd = tl.split(tl.reshape(pairs, (rows.shape[0], 2, 2)))  # pairs (0, 2) and (1, 3)
            x0, x2 = tl.split(even)
            x1, x3 = tl.split(odd)
        else:
            x0, x1 = tl.split(pairs)
            x2, x3 = x0, x1
        return x0[:, None], x1[:, None], x2[:, None], x3[:, None]

    @triton.jit
    def _table_planes(lut_ptr, r: tl.constexpr, cols_n, in_n, N, LUT_SIZE: tl.constexpr):
        """Entries 4r..4r + 3 of each column's table (one table per row) as two int32 byte planes
        [1, BLOCK_N]: their low bytes, their high bytes (of the entries rounded to fp16)."""
        low = tl.zeros(cols_n.shape, tl.int32)
        high = tl.zeros(cols_n.shape, tl.int32)
        for i in tl.static_range(4):
            if 4 * r + i < LUT_SIZE:
                entry = tl.load(lut_ptr + (4 * r + i) * N + cols_n, mask=in_n, other=0.0).to(tl.float16)
                bits = entry.to(tl.int16, bitcast=True).to(tl.int32)
                low |= (bits & 0xFF) << (8 * i)
                high |= ((bits >> 8) & 0xFF) << (8 * i)
        return low[None, :], high[None, :]

    @triton.jit
    def _tables(lut_ptr, cols_n, in_n, N, LUT_SIZE: tl.constexpr):
        """Each column's table (one per row) as the byte planes of entries 0-3, ..., 12-15: the four
        of low bytes, then the four of high bytes (zero past the table)."""
        l0, h0 = _table_planes(lut_ptr, 0, cols_n, in_n, N, LUT_SIZE)
        l1, h1 = _table_planes(lut_ptr, 1, cols_n, in_n, N, LUT_SIZE)
        l2, h2 = _table_planes(lut_ptr, 2, cols_n, in_n, N, LUT_SIZE)
        l3, h3 = _table_planes(lut_ptr, 3, cols_n, in_n, N, LUT_SIZE)
        return l0, l1, l2, l3, h0, h1, h2, h3

    @triton.jit
    def _table_entry(codes, l0, l1, l2, l3, h0, h1, h2, h3):
        """Table entry `codes` as fp16 out of the byte planes (what the PRMT look-ups select)."""
        which = codes >> 2
        shift = (codes & 3) * 8
        low = tl.where(which == 0, l0, tl.where(which == 1, l1, tl.where(which == 2, l2, l3)))
        high = tl.where(which == 0, h0, tl.where(which == 1, h1, tl.where(which == 2, h2, h3)))
        bits = ((low >> shift) & 0xFF) | (((high >> shift) & 0xFF) << 8)
        return bits.to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _half2_table_dot(words, x0, x1, x2, x3, l0, l1, l2, l3, h0, h1, h2, h3, LUT_SIZE: tl.constexpr,
                         ASM: tl.constexpr):
        """Each word's codes looked up in their column's table and times their inputs, in half2
        arithmetic (`half2_table_dot_ptx`), as float32 [rows, BLOCK_N]; the inputs regrouped per
        word row into the pairs (0, 2), (1, 3), (4, 6), (5, 7) that the look-ups give. Under the
        interpreter the same sums in Triton's operations."""
        x02 = (x0 & 0xFFFF) | (x1 << 16)
        x13 = ((x0 >> 16) & 0xFFFF) | (x1 & -65536)
        x46 = (x2 & 0xFFFF) | (x3 << 16)
        x57 = ((x2 >> 16) & 0xFFFF) | (x3 & -65536)
        if ASM:
            if LUT_SIZE == 16:
                sums = tl.inline_asm_elementwise(_HALF2_TABLE_16, "=r" + ",r" * 13,
                                                 [words, x02, x13, x46, x57, l0, l1, l2, l3, h0, h1, h2, h3],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:
                sums = tl.inline_asm_elementwise(_HALF2_TABLE_8, "=r" + ",r" * 9,
                                                 [words, x02, x13, x46, x57, l0, l1, h0, h1],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            partial = sums.to(tl.float32, bitcast=True)
        else:  # lanes as the PTX sums them: inputs 0, 1, 4, 5 and 2, 3, 6, 7
            lanes = tl.zeros(words.shape, tl.float16)
            other = tl.zeros(words.shape, tl.float16)
            for j in tl.static_range(8):
                if j % 4 < 2:
                    pair = x0 if j < 4 else x2
                else:
                    pair = x1 if j < 4 else x3
                half = (pair >> (16 * (j % 2))) & 0xFFFF
                x_j = half.to(tl.int16).to(tl.float16, bitcast=True)
                product = _table_entry(_code(words, j, 4), l0, l1, l2, l3, h0, h1, h2, h3) * x_j
                if j % 4 < 2:
                    lanes += product
                else:
                    other += product
            partial = (lanes + other).to(tl.float32)
        return partial

    @triton.jit
    def _half2_dot(words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero, BITS: tl.constexpr, TOKENS: tl.constexpr,
                   ASM: tl.constexpr):
        """Each word's codes times their inputs x (and y, a second token's, for TOKENS 2), in half2
        arithmetic (about 2.2 instructions a weight where float32 takes 5: `half2_dot_ptx`), as
        float32 [rows, BLOCK_N] per token (for one token the second is the first): the products
        x (q - z) / 256 of a word summed in fp16, then times 256 s in float32. Under the
        interpreter, which runs no PTX, the same arithmetic in Triton's operations."""
        if ASM:
            zero2 = (zero | _EXPONENT) * 0x10001
            odd2 = ((zero << 4) | _ODD_EXPONENT) * 0x10001
            if TOKENS == 2 and BITS == 4:
                sums, sums2 = tl.inline_asm_elementwise(
                    _HALF2_DOT2_4, "=r,=r,r,r,r,r,r,r,r,r,r,r,r", [words, x0, x1, x2, x3, y0, y1, y2, y3, zero2, odd2],
                    dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
            elif TOKENS == 2:
                sums, sums2 = tl.inline_asm_elementwise(_HALF2_DOT2_8, "=r,=r,r,r,r,r,r,r",
                                                        [words, x0, x1, y0, y1, zero2], dtype=(tl.int32, tl.int32),
                                                        is_pure=True, pack=1)
            elif BITS == 4:
                sums = tl.inline_asm_elementwise(_HALF2_DOT_4, "=r,r,r,r,r,r,r,r",
                                                 [words, x0, x1, x2, x3, zero2, odd2], dtype=tl.int32, is_pure=True,
                                                 pack=1)
                sums2 = sums
            else:
                sums = tl.inline_asm_elementwise(_HALF2_DOT_8, "=r,r,r,r,r", [words, x0, x1, zero2], dtype=tl.int32,
                                                 is_pure=True, pack=1)
                sums2 = sums
            partial = sums.to(tl.float32, bitcast=True)
            partial2 = sums2.to(tl.float32, bitcast=True)
        else:
            partial = _half2_sums(words, x0, x1, x2, x3, zero, BITS)
            if TOKENS == 2:
                partial2 = _half2_sums(words, y0, y1, y2, y3, zero, BITS)
            else:
                partial2 = partial
        factor = scale.to(tl.float32) * 256.0
        return partial * factor, partial2 * factor

    @triton.jit
    def _half2_sums(words, x0, x1, x2, x3, zero, BITS: tl.constexpr):
        """What `half2_dot_ptx` computes for one token, in Triton's operations (the interpreter's)."""
        PAIRS: tl.constexpr = 16 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        low = tl.zeros(words.shape, tl.float16)
        high = tl.zeros(words.shape, tl.float16)
        for i in tl.static_range(PAIRS):
            if i == 0:
                pair = x0
            elif i == 1:
                pair = x1
            elif i == 2:
                pair = x2
            else:
                pair = x3
            x_low = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            x_high = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
            low += (((words >> (BITS * i)) & MASK) - zero).to(tl.float16) * (1 / 256) * x_low
            high += (((words >> (BITS * (i + PAIRS))) & MASK) - zero).to(tl.float16) * (1 / 256) * x_high
        return (low + high).to(tl.float32)

    @triton.jit
    def _load_tile(w_ptr, s_ptr, z_ptr, lut_ptr, start, cols_n, in_n, N, K, GROUPS,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr,
                   LUT_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, RAW: tl.constexpr):
        """The words of inputs [start, start + BLOCK_K) for columns cols_n, and what turns their codes
        into weights, per word row: the scale and the zero point in float32 (uniform grids; RAW: as
        stored, and the zero as an int32), or the tile's tables and each row's offset into them
        (look-up tables; a tile may span several groups)."""
        PER_WORD: tl.constexpr = 32 // BITS
        words, rows, mask = _load_words(w_ptr, start, cols_n, in_n, N, K, BITS, BLOCK_K, EVEN_K)
        group = rows * PER_WORD // GROUP
        if HAS_LUT:
            TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP if GROUP < BLOCK_K else 1
            first = start // GROUP
            entries = tl.arange(0, TILE_GROUPS * LUT_SIZE)
            present = _below(first + entries // LUT_SIZE, GROUPS, EVEN_K)[:, None] & in_n[None, :]
            a = tl.load(lut_ptr + (first * LUT_SIZE + entries)[:, None] * N + cols_n[None, :], mask=present, other=0.0)
            b = ((group - first) * LUT_SIZE)[:, None]
        else:
            a = tl.load(s_ptr + group[:, None] * N + cols_n[None, :], mask=mask, other=0.0)
            if HAS_ZEROS:
                b = tl.load(z_ptr + group[:, None] * N + cols_n[None, :], mask=mask, other=0).to(tl.int32)
            else:
                b = tl.full(words.shape, 1 << (BITS - 1), tl.int32)
            if not RAW:  # the zero byte under the exponent of 2**23, less 2**23: exact, no int-to-float conversion
                a = a.to(tl.float32)
                b = (b | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return words, a, b

    @triton.jit
    def _lookup(words, j: tl.constexpr, table, offsets, BITS: tl.constexpr):
        """Code j of each word looked up in its row's table, in float32."""
        return tl.gather(table, _code(words, j, BITS) + offsets, axis=0).to(tl.float32)

    @triton.jit
    def _input(row_ptr, k, K, EVEN_K: tl.constexpr):
        """x[k] of one token in float32, as a column [rows, 1]."""
        return tl.load(row_ptr + k[:, None], mask=_below(k, K, EVEN_K)[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _biased(words, j: tl.constexpr, BITS: tl.constexpr):
        """Code j of each word as the float 1 + q / 2**BITS, exactly: the code moved to the top of
        an fp32 mantissa under exponent 0 by one shift, then masked and given the exponent by one
        LOP3 (no int-to-float conversion)."""
        SHIFT: tl.constexpr = 23 - BITS - BITS * ((j >> 1) + (j & 1) * (16 // BITS))  # slot of code j
        if SHIFT >= 0:
            moved = words << SHIFT
        else:
            moved = words >> -SHIFT
        mantissa: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
        return (moved & mantissa | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _one_token(row_ptr, words, ks, K, BITS: tl.constexpr, EVEN_K: tl.constexpr):
        """Per word, sum_j x[k_j] (1 + q_j / 2**BITS) over its codes j (k_j = ks + j), and per word
        row, sum_j x[k_j]; then sum_j x[k_j] (q_j - z) s = s 2**BITS (products - (1 + z / 2**BITS) sums),
        so the scale and zero apply once per word, and each code costs a shift, a LOP3 and an FMA."""
        products = tl.zeros(words.shape, tl.float32)
        sums = tl.zeros((words.shape[0], 1), tl.float32)
        for j in tl.static_range(32 // BITS):
            xj = _input(row_ptr, ks + j, K, EVEN_K)
            products += xj * _biased(words, j, BITS)
            sums += xj
        return products, sums

    @triton.jit
    def _tile_weights(words, a, b, BITS: tl.constexpr, HAS_LUT: tl.constexpr, dtype: tl.constexpr):
        """All the words' codes as weights [BLOCK_K, BLOCK_N] in `dtype`, exactly the reference's, in
        input order: codes [rows, per word, N] merged into rows of K. A table entry, or (q - z) * s
        with q as the float 2**23 + q (the code under that exponent: no int-to-float conversion)."""
        PER_WORD: tl.constexpr = 32 // BITS
        j = tl.arange(0, PER_WORD)
        slots = (j >> 1) + (j & 1) * (PER_WORD // 2)
        codes = (words[:, None, :] >> (slots * BITS)[None, :, None]) & ((1 << BITS) - 1)
        if HAS_LUT:
            index = tl.reshape(codes + b[:, :, None], (words.shape[0] * PER_WORD, words.shape[1]))
            weights = tl.gather(a, index, axis=0)
        else:
            biased = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (b + 8388608.0)[:, None, :]
            weights = tl.reshape(biased * a[:, None, :], (words.shape[0] * PER_WORD, words.shape[1]))
        return weights.to(dtype)

    @triton.jit
    def _half2_pair(words, pair: tl.constexpr, zero2, scale2, zero, scale, BITS: tl.constexpr, ASM: tl.constexpr):
        """The weights [rows, BLOCK_N] (fp16) of codes 2 pair and 2 pair + 1 of each word."""
        shifted = words >> (BITS * pair)
        if ASM:
            if BITS == 4:
                low, high = tl.inline_asm_elementwise(_HALF2_WEIGHTS_4, "=h,=h,r,r,r", [shifted, zero2, scale2],
                                                      dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
            else:
                low, high = tl.inline_asm_elementwise(_HALF2_WEIGHTS_8, "=h,=h,r,r,r", [shifted, zero2, scale2],
                                                      dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        else:  # the interpreter runs no PTX: the same arithmetic in Triton's operations
            MASK: tl.constexpr = (1 << BITS) - 1
            low = ((shifted & MASK) - zero).to(tl.float16) * scale
            high = (((shifted >> 16) & MASK) - zero).to(tl.float16) * scale
        return low, high

    @triton.jit
    def _half2_tile_weights(words, scale, zero, BITS: tl.constexpr, ASM: tl.constexpr):
        """All the words' codes as fp16 weights [BLOCK_K, BLOCK_N] in input order, made two at a
        time in half2 arithmetic (`half2_weights_ptx`: about two instructions a weight), from each
        word row's fp16 scale and int32 zero (`_load_tile` RAW)."""
        zero2 = (zero | 0x6400) * 0x10001
        scale2 = (scale.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
        p0 = tl.join(*_half2_pair(words, 0, zero2, scale2, zero, scale, BITS, ASM))  # [rows, N, 2]: codes 0, 1
        p1 = tl.join(*_half2_pair(words, 1, zero2, scale2, zero, scale, BITS, ASM))
        if BITS == 4:
            p2 = tl.join(*_half2_pair(words, 2, zero2, scale2, zero, scale, BITS, ASM))
            p3 = tl.join(*_half2_pair(words, 3, zero2, scale2, zero, scale, BITS, ASM))
            tile = _nibble_tile(p0, p1, p2, p3)
        else:
            tile = tl.reshape(tl.permute(tl.join(p0, p1), (0, 3, 2, 1)), (words.shape[0] * 4, words.shape[1]))  # 2 i + p
        return tile

    @triton.jit
    def _nibble_tile(p0, p1, p2, p3):
        """A tile [rows * 8, N] in input order from the weights of 4-bit codes (0, 1), (2, 3), (4, 5)
        and (6, 7) of each word, joined in pairs [rows, N, 2]."""
        tile = tl.permute(tl.join(tl.join(p0, p1), tl.join(p2, p3)), (0, 4, 3, 2, 1))  # code 4 i1 + 2 i0 + p
        return tl.reshape(tile, (p0.shape[0] * 8, p0.shape[1]))

    @triton.jit
    def _table_tile_weights(words, l0, l1, l2, l3, h0, h1, h2, h3, LUT_SIZE: tl.constexpr, ASM: tl.constexpr):
        """All the words' 4-bit codes looked up in their column's table (byte planes from
        `_table_planes`) as fp16 weights [BLOCK_K, BLOCK_N] in input order: eight a word from one
        inline-asm block (`half2_table_weights_ptx`), where `tl.gather` spends about 19 instructions
        a weight. Under the interpreter the same look-ups in Triton's operations."""
        if ASM:
            f16 = tl.float16
            if LUT_SIZE == 16:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _TABLE_WEIGHTS_16, "=h," * 8 + "r" + ",r" * 8, [words, l0, l1, l2, l3, h0, h1, h2, h3],
                    dtype=(f16, f16, f16, f16, f16, f16, f16, f16), is_pure=True, pack=1)
            else:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _TABLE_WEIGHTS_8, "=h," * 8 + "r" + ",r" * 4, [words, l0, l1, h0, h1],
                    dtype=(f16, f16, f16, f16, f16, f16, f16, f16), is_pure=True, pack=1)
        else:
            w0 = _table_entry(_code(words, 0, 4), l0, l1, l2, l3, h0, h1, h2, h3)
            w1 = _table_entry(_code(words, 1, 4), l0, l1, l2, l3, h0, h1, h2, h3)
            w2 = _table_entry(_code(words, 2, 4), l0, l1, l2, l3, h0, h1, h2, h3)
            w3 = _table_entry(_code(words, 3, 4), l0, l1, l2, l3, h0, h1, h2, h3)
            w4 = _table_entry(_code(words, 4, 4), l0, l1, l2, l3, h0, h1, h2, h3)
            w5 = _table_entry(_code(words, 5, 4), l0, l1, l2, l3, h0, h1, h2, h3)
            w6 = _table_entry(_code(words, 6, 4), l0, l1, l2, l3, h0, h1, h2, h3)
            w7 = _table_entry(_code(words, 7, 4), l0, l1, l2, l3, h0, h1, h2, h3)
        return _nibble_tile(tl.join(w0, w1), tl.join(w2, w3), tl.join(w4, w5), tl.join(w6, w7))

    @triton.jit
    def _outliers(x_ptr, ov_ptr, oc_ptr, oo_ptr, rows_m, in_m, cols_n, in_n, K, MAX_ROW_OUTLIERS,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's share of sum_j x[m, column_j] * value_j over its rows' outliers: slots
        pid_k, pid_k + splits, ..., so the split programs share the serial loads."""
        first = tl.load(oo_ptr + cols_n, mask=in_n, other=0)
        count = tl.load(oo_ptr + cols_n + 1, mask=in_n, other=0) - first
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(tl.program_id(2), MAX_ROW_OUTLIERS, tl.num_programs(2)):
            present = in_n & (j < count)
            column = tl.load(oc_ptr + first + j, mask=present, other=0)
            value = tl.load(ov_ptr + first + j, mask=present, other=0.0).to(x_ptr.dtype.element_ty)
            xs = tl.load(x_ptr + rows_m[:, None] * K + column[None, :], mask=in_m[:, None] & present[None, :],
                         other=0.0)
            total += xs.to(tl.float32) * value.to(tl.float32)[None, :]
        return total

    @triton.jit
    def _write(y_ptr, ws_ptr, arrivals_ptr, acc, rows_m, in_m, cols_n, in_n, N, SPLIT: tl.constexpr,
               PENDING: tl.constexpr):
        """y = acc; split along K, the programs of a tile add into the float32 workspace and the last to
        arrive writes y and zeroes the workspace and its counter for the next launch. PENDING: each
        program adds into the caller's sums (the workspace here), which the product's reader finishes."""
        offsets = rows_m[:, None] * N + cols_n[None, :]
        mask = in_m[:, None] & in_n[None, :]
        if SPLIT or PENDING:
            tl.atomic_add(ws_ptr + offsets, acc, mask=mask, sem="relaxed")
        if SPLIT:
            tl.debug_barrier()  # every thread's share is in before one thread moves the count (acq_rel)
            counter = arrivals_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            if tl.atomic_add(counter, 1) == tl.num_programs(2) - 1:
                words = ws_ptr.to(tl.pointer_type(tl.int32)) + offsets  # exchanged as words: any Triton does that
                total = tl.atomic_xchg(words, tl.zeros(acc.shape, tl.int32), mask=mask, sem="relaxed")
                total = total.to(tl.float32, bitcast=True)
                tl.store(y_ptr + offsets, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter, 0)
        elif not PENDING:
            tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, ov_ptr, oc_ptr, oo_ptr, y_ptr, ws_ptr, arrivals_ptr,
                       M, N, K, GROUPS, MAX_ROW_OUTLIERS,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr,
                       LUT_SIZE: tl.constexpr, HAS_OUTLIERS: tl.constexpr, SPLIT: tl.constexpr, PENDING: tl.constexpr,
                       EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                       HALF2: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
        wait_for_previous(PDL)
        PER_WORD: tl.constexpr = 32 // BITS
        ROWS: tl.constexpr = BLOCK_K // PER_WORD
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rows_m < M, _below(cols_n, N, EVEN_N)
        if BLOCK_M == 1:  # CUDA cores: products kept per word row, summed over rows at the end
            acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        elif SWAP:  # y^T = W x^T: the weights are the dot's first operand, the tokens its columns
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        TABLES_IN_REGISTERS: tl.constexpr = HALF2 and HAS_LUT  # one table per row, looked up by PRMT
        if TABLES_IN_REGISTERS:
            l0, l1, l2, l3, h0, h1, h2, h3 = _tables(lut_ptr, cols_n, in_n, N, LUT_SIZE)
        # software-pipelined: STAGES - 1 tiles' loads in flight (through shared memory) during the arithmetic
        for start in tl.range(pid_k * BLOCK_K, K, BLOCK_K * tl.num_programs(2), num_stages=STAGES):
            if TABLES_IN_REGISTERS:
                words, _, _ = _load_words(w_ptr, start, cols_n, in_n, N, K, BITS, BLOCK_K, EVEN_K)
            else:
                words, a, b = _load_tile(w_ptr, s_ptr, z_ptr, lut_ptr, start, cols_n, in_n, N, K, GROUPS,
                                         BITS, GROUP, HAS_ZEROS, HAS_LUT, LUT_SIZE, BLOCK_K, EVEN_K, HALF2)
            ks = start + tl.arange(0, ROWS) * PER_WORD  # the input of code 0 of each word row
            if BLOCK_M == 1:
                if HAS_LUT:
                    for j in tl.static_range(PER_WORD):
                        acc += _input(x_ptr + pid_m * K, ks + j, K, EVEN_K) * _lookup(words, j, a, b, BITS)
                else:
                    products, sums = _one_token(x_ptr + pid_m * K, words, ks, K, BITS, EVEN_K)
                    acc += (a * (1 << BITS)) * (products - (1.0 + b * (1.0 / (1 << BITS))) * sums)
            else:
                if TABLES_IN_REGISTERS:
                    weights = _table_tile_weights(words, l0, l1, l2, l3, h0, h1, h2, h3, LUT_SIZE, ASM)
                elif HALF2:
                    weights = _half2_tile_weights(words, a, b, BITS, ASM)
                else:
                    weights = _tile_weights(words, a, b, BITS, HAS_LUT, x_ptr.dtype.element_ty)
                inputs = start + tl.arange(0, BLOCK_K)
                present = in_m[:, None] & _below(inputs, K, EVEN_K)[None, :]
                if SWAP:
                    xt = tl.load(x_ptr + rows_m[None, :] * K + inputs[:, None], mask=tl.trans(present), other=0.0)
                    acc = tl.dot(tl.trans(weights), xt, acc)
                else:
                    xs = tl.load(x_ptr + rows_m[:, None] * K + inputs[None, :], mask=present, other=0.0)
                    acc = tl.dot(xs, weights, acc)
        if BLOCK_M == 1:
            acc = tl.sum(acc, axis=0)[None, :]
        elif SWAP:
            acc = tl.trans(acc)
        if HAS_OUTLIERS:
            acc += _outliers(x_ptr, ov_ptr, oc_ptr, oo_ptr, rows_m, in_m, cols_n, in_n, K, MAX_ROW_OUTLIERS,
                             BLOCK_M, BLOCK_N)
        _write(y_ptr, ws_ptr, arrivals_ptr, acc, rows_m, in_m, cols_n, in_n, N, SPLIT, PENDING)

    @triton.jit
    def _half2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, ov_ptr, oc_ptr, oo_ptr, y_ptr, ws_ptr, arrivals_ptr,
                      M, N, K, MAX_ROW_OUTLIERS,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr,
                      LUT_SIZE: tl.constexpr, HAS_OUTLIERS: tl.constexpr, SPLIT: tl.constexpr, PENDING: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      TOKENS: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
        """y[tokens, tile of BLOCK_N] for TOKENS tokens (1 or 2: a uniform grid's weights made once for
        both) in half2 arithmetic, over this program's share of K in tiles of BLOCK_K inputs inside one
        group (a uniform grid), or with one table per row held in registers. STAGES 1: the next tile's
        loads are issued into registers before this tile's arithmetic, so the last tile is done after
        the loop, which never loads past K. STAGES 2 or more: Triton's pipeliner copies STAGES - 1
        tiles ahead into shared memory (cp.async), where loads in flight hold no registers."""
        wait_for_previous(PDL)
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = _below(cols_n, N, EVEN_N)
        row_ptr = x_ptr + pid_m * TOKENS * K
        second = (pid_m * TOKENS + 1 + tl.zeros((1, 1), tl.int32)) < M  # as a tensor, for the interpreter's masks
        step = BLOCK_K * tl.num_programs(2)
        first = pid_k * BLOCK_K
        zero_plane = tl.zeros((1, BLOCK_N), tl.int32)
        l0, l1, l2, l3, h0, h1, h2, h3 = zero_plane, zero_plane, zero_plane, zero_plane, zero_plane, zero_plane, \
            zero_plane, zero_plane
        if HAS_LUT:
            l0, l1, l2, l3, h0, h1, h2, h3 = _tables(lut_ptr, cols_n, in_n, N, LUT_SIZE)
        acc = tl.zeros((BLOCK_K * BITS // 32, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_K * BITS // 32, BLOCK_N), dtype=tl.float32)  # the second token's
        if STAGES > 1:
            for start in tl.range(first, K, step, num_stages=STAGES):
                words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero = _half2_load(
                    row_ptr, second, w_ptr, s_ptr, z_ptr, start, cols_n, in_n, N, K, BITS, GROUP, HAS_ZEROS, HAS_LUT,
                    BLOCK_K, TOKENS, EVEN_K)
                products, products2 = _half2_tile(words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero,
                                                  l0, l1, l2, l3, h0, h1, h2, h3, BITS, HAS_LUT, LUT_SIZE, TOKENS, ASM)
                acc += products
                acc2 += products2
        else:
            if EVEN_K:  # a program with no tile (more shares than tiles) reads the last, unmasked, and adds none of it
                start = tl.minimum(first, K - BLOCK_K)
            else:
                start = first
            words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero = _half2_load(
                row_ptr, second, w_ptr, s_ptr, z_ptr, start, cols_n, in_n, N, K, BITS, GROUP, HAS_ZEROS, HAS_LUT,
                BLOCK_K, TOKENS, EVEN_K)
            for start in range(first + step, K, step):
                following = _half2_load(row_ptr, second, w_ptr, s_ptr, z_ptr, start, cols_n, in_n, N, K, BITS, GROUP,
                                        HAS_ZEROS, HAS_LUT, BLOCK_K, TOKENS, EVEN_K)
                products, products2 = _half2_tile(words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero,
                                                  l0, l1, l2, l3, h0, h1, h2, h3, BITS, HAS_LUT, LUT_SIZE, TOKENS, ASM)
                acc += products
                acc2 += products2
                words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero = following
            products, products2 = _half2_tile(words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero,
                                              l0, l1, l2, l3, h0, h1, h2, h3, BITS, HAS_LUT, LUT_SIZE, TOKENS, ASM)
            acc += products
            acc2 += products2
        total = tl.sum(acc, axis=0)[None, :]
        if TOKENS == 2:
            total = tl.where(tl.arange(0, 2)[:, None] == 0, total, tl.sum(acc2, axis=0)[None, :])
        total = tl.where(first < K, total, 0.0)
        rows_m = pid_m * TOKENS + tl.arange(0, TOKENS)
        if HAS_OUTLIERS:
            total += _outliers(x_ptr, ov_ptr, oc_ptr, oo_ptr, rows_m, rows_m < M, cols_n, in_n, K, MAX_ROW_OUTLIERS,
                               TOKENS, BLOCK_N)
        _write(y_ptr, ws_ptr, arrivals_ptr, total, rows_m, rows_m < M, cols_n, in_n, N, SPLIT, PENDING)

    @triton.jit
    def _half2_tile(words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero, l0, l1, l2, l3, h0, h1, h2, h3,
                    BITS: tl.constexpr, HAS_LUT: tl.constexpr, LUT_SIZE: tl.constexpr, TOKENS: tl.constexpr,
                    ASM: tl.constexpr):
        """One tile's products for each token, float32 [rows, BLOCK_N] (for one token the second is the
        first): by the weight's table in registers, or its uniform grid."""
        if HAS_LUT:
            products = _half2_table_dot(words, x0, x1, x2, x3, l0, l1, l2, l3, h0, h1, h2, h3, LUT_SIZE, ASM)
            if TOKENS == 2:
                products2 = _half2_table_dot(words, y0, y1, y2, y3, l0, l1, l2, l3, h0, h1, h2, h3, LUT_SIZE, ASM)
            else:
                products2 = products
        else:
            products, products2 = _half2_dot(words, x0, x1, x2, x3, y0, y1, y2, y3, scale, zero, BITS, TOKENS, ASM)
        return products, products2

    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, N, K, GROUPS,
                           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr,
                           LUT_SIZE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """W^T [K, N] in out's dtype, a [BLOCK_K, BLOCK_N] tile a program."""
        cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = _below(cols_n, N, EVEN_N)
        start = tl.program_id(1) * BLOCK_K
        words, a, b = _load_tile(w_ptr, s_ptr, z_ptr, lut_ptr, start, cols_n, in_n, N, K, GROUPS,
                                 BITS, GROUP, HAS_ZEROS, HAS_LUT, LUT_SIZE, BLOCK_K, EVEN_K, False)
        inputs = start + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + inputs[:, None] * N + cols_n[None, :],
                 _tile_weights(words, a, b, BITS, HAS_LUT, out_ptr.dtype.element_ty),
                 mask=_below(inputs, K, EVEN_K)[:, None] & in_n[None, :])

"""4-bit products of a few to a few hundred tokens on Hopper, written in Gluon so that every operand
of a step is in shared memory before the step needs it.

qtool's Triton tiles of a few tokens (quant_matmul's swapped dots, and a tile over swizzled codes
since replaced by `w4_fragments`) stay far from the weights' bandwidth: ncu showed them waiting on
loads (the scales and zero points loaded inside the loop) and on every wgmma at once
(kernels_h200.md, Version 13). Here a step is 64
inputs (one group or part of one), and all it reads (x's tile [BLOCK_M, 64], the words of codes
[8, BLOCK_N], the group's row of scales and of zero points) arrives by TMA into a ring of STAGES
buffers under one mbarrier, issued STAGES - 1 steps ahead. The words become fp16 weights by
inline PTX, two an instruction (`DEQUANTIZE`: each pair of codes taken into a half2 under fp16's
exponent as 1024 + q by one LOP3, less 1024 + z, times the scale: exact, then one rounding, as
`quant_matmul.reference` rounds W), are stored into one of two shared-memory tiles, and that
tile's wgmma (W [BLOCK_N, 64] times x^T: the tokens are the wgmma's n) is issued while the
previous step's is still in flight. On an H200 (benchmarks/results/kernels_h200.md, "Version 14")
128 tokens took 15-19% less time than the Triton tiles; bound by issuing instructions (a quarter of
the loop's dequantize, the rest issue the copies, address and synchronise), it has since given way
to `w4_fragments` (its weights from registers), except where that kernel's copy of the codes is not
made ("Version 16").

Takes (`takes`): 4-bit uniform grids with fp16 scales and byte zero points (or none: symmetric),
groups of a power of two of at least 64 inputs or one a row, no outliers; fp16 activations; compute
capability 9.x with Gluon (`gluon_hopper`). TMA reads rows 16-byte aligned, so N is a multiple of
16 and K of 8; it fills tiles past the edges with zeros (a weight there meets an input of zero).
Its products end as quant_matmul's do (`write_tile`): stored, or added into a workspace whose last
program writes y (K split), or into the caller's pending sums.
"""

from __future__ import annotations

import torch

from qtool.kernels import gluon_hopper
from qtool.kernels.dependent_launch import dependent_launch
from qtool.kernels.gluon_hopper import (cta_barrier, descriptor, fence_async_shared, gl, gluon, mbarrier, tma_load,
                                        triton, wait_for_previous, warpgroup_mma, warpgroup_mma_wait)

STEP = 64  # inputs a step: a group of 64, or part of a larger one


def _dequantize_ptx() -> str:
    """A word ($8; code j at nibble j / 2 + 4 (j % 2), quant_matmul.code_slots) -> its 8 weights in
    order ($0-$7), given 1024 + the zero ($9) and the scale ($10) in fp16: pair p (codes 2p, 2p + 1)
    is nibbles p and p + 4, taken under fp16's exponent into the halves of a half2 by one LOP3."""
    lines = [".reg .b32 t, a, zz, ss;", "mov.b32 zz, {$9, $9};", "mov.b32 ss, {$10, $10};"]
    for pair in range(4):
        if pair:
            lines.append(f"shr.u32 a, $8, {4 * pair};")
        lines += [f"lop3.b32 t, {'a' if pair else '$8'}, 0x000f000f, 0x64006400, 0xea;", "sub.rn.f16x2 t, t, zz;",
                  "mul.rn.f16x2 t, t, ss;", f"mov.b32 {{${2 * pair}, ${2 * pair + 1}}}, t;"]
    return "{\n" + "\n".join(lines) + "\n}"


DEQUANTIZE = _dequantize_ptx()


def takes(weight, dtype: torch.dtype) -> bool:
    """Whether the kernel runs products of this `KernelWeight` by activations of `dtype` here: on
    compute capability 9.x with Gluon, for a weight it `fits` (an x not 16-byte aligned is copied first,
    quant_matmul's `_launch_w4_wgmma`)."""
    return gluon_hopper.runs_on(weight.packed.device) and fits(weight, dtype)


def fits(weight, dtype: torch.dtype) -> bool:
    """Whether the kernel computes products of this weight by activations of `dtype` (see the
    module's docstring): its tensors contiguous and 16-byte aligned, as TMA reads them."""
    group = weight.group_size
    tensors = [weight.packed, weight.scales] + ([] if weight.zeros is None else [weight.zeros])
    return (dtype == torch.float16 and weight.bits == 4 and weight.lut is None and weight.outlier_values is None
            and weight.scales.dtype == torch.float16 and (weight.zeros is None or weight.zeros.dtype == torch.uint8)
            and (group == -1 or (group >= STEP and group & (group - 1) == 0))
            and weight.out_features % 16 == 0 and weight.in_features % 8 == 0
            and all(tensor.is_contiguous() and tensor.data_ptr() % 16 == 0 for tensor in tensors))


def grid(m: int, n: int, k: int, config: dict) -> tuple[int, int, int]:
    """The programs of a product: tiles of M, tiles of N, shares of K. The tiles of M (tokens) come
    first, so that the programs running at once share their weights' tiles, read from memory once,
    where x, re-read by every tile of N, stays in L2. No share is empty (SPLIT_K 12 of 64 steps is 11
    shares of 6): the kernels take a share's first step before their loop, so that ptxas keeps the
    wgmmas in flight (`tile_and_share`)."""
    steps, split = triton.cdiv(k, STEP), max(config["SPLIT_K"], 1)  # (no division by 0: launch refuses it)
    shares = triton.cdiv(steps, triton.cdiv(steps, split))
    return triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), shares


def launch(x: torch.Tensor, weight, config: dict, group: int, out: torch.Tensor, workspace: torch.Tensor,
           arrivals: torch.Tensor, pending: bool) -> None:
    """x [M, K] (contiguous) @ W^T with `config`'s BLOCK_M, BLOCK_N, SPLIT_K, num_stages and num_warps
    on a grid of N tiles x M tiles x shares of K; `group` as quant_matmul's kernels take it (one a
    row: wider than any K). `out`, `workspace` and `arrivals` as quant_matmul's `_outputs` makes them
    (with `pending`, the caller's sums in all three)."""
    block_n, split, warps = config["BLOCK_N"], config["SPLIT_K"], config["num_warps"]
    # a ring of 2+ buffers; rows of scales of 128 bytes or more (each TMA box lands 128-byte aligned); a
    # warp's 16 rows of each wgmma
    if config["num_stages"] < 2 or split < 1 or block_n % 64 or block_n % (16 * warps):
        raise ValueError(f"the W4 wgmma kernel takes num_stages >= 2, SPLIT_K >= 1 and BLOCK_N a multiple of 64 "
                         f"and of 16 x num_warps, got {config}")
    start(_w4_kernel, descriptors(x, weight, config["BLOCK_M"], block_n), x, weight, config, group, out, workspace,
          arrivals, pending)


def start(kernel, descriptors: tuple, x: torch.Tensor, weight, config: dict, group: int, out: torch.Tensor,
          workspace: torch.Tensor, arrivals: torch.Tensor, pending: bool) -> None:
    """Launches a W4 Gluon kernel of this module's signature (`_w4_kernel`, or `w4_fragments`') with its
    TMA `descriptors` on `grid`, as a programmatic dependent of the kernel before where it can
    (`dependent_launch`; the kernel loads its first steps' weights before waiting for that one, see
    `start_ring`); the rest as `launch` takes it (the K split writes through the workspace unless the
    product is left pending)."""
    (m, k), n = x.shape, weight.out_features
    programs = grid(m, n, k, config)  # split as the caller sized the workspace: by the shares there are
    kernel[programs](
        *descriptors, out, workspace, arrivals, m, n, k, GROUP=group, HAS_ZEROS=weight.zeros is not None,
        SPLIT=programs[2] > 1 and not pending, PENDING=pending, BLOCK_N=config["BLOCK_N"],
        STAGES=config["num_stages"], num_warps=config["num_warps"], **dependent_launch(x.device))


def descriptors(x: torch.Tensor, weight, block_m: int, block_n: int) -> tuple:
    """The kernel's TMA descriptors: x's tiles, the words', and rows of scales and of zero points
    (`group_descriptors`)."""
    return (descriptor(x, [block_m, STEP]), *weight.remembered(
        ("w4_wgmma", block_n), lambda: (descriptor(weight.packed, [STEP // 8, block_n]),
                                        *group_descriptors(weight, block_n))))


def group_descriptors(weight, block_n: int) -> tuple:
    """TMA descriptors of rows [1, block_n] of the weight's scales and of its zero points (the scales'
    again where there are none)."""
    scales = descriptor(weight.scales, [1, block_n], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16,
                                                                          rank=2))
    # each TMA box lands 128-byte aligned: a row of zero points at least 128 bytes long
    zeros = scales if weight.zeros is None else descriptor(
        weight.zeros, [1, max(block_n, 128)], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2))
    return scales, zeros


if gluon is not None:
    _DEQUANTIZE = gl.constexpr(DEQUANTIZE)
    _STEP = gl.constexpr(STEP)

    @gluon.jit
    def tile_and_share(K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """This program's tile (its first output and token) and share of K's steps (the first, and how
        many: program_id(2) of num_programs(2) shares, the last possibly short, none empty by `grid`)."""
        blocks = gl.cdiv(K, _STEP)
        share = gl.cdiv(blocks, gl.num_programs(2))
        first = gl.program_id(2) * share
        return gl.program_id(1) * BLOCK_N, gl.program_id(0) * BLOCK_M, first, gl.minimum(share, blocks - first)

    @gluon.jit
    def start_ring(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, steps, first, off_m, off_n,
                   GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr,
                   FRAGMENTS: gl.constexpr = False):
        """The ring's barriers set up and its first STAGES - 1 steps' loads issued: the weights' before
        the wait for the kernel before (PDL), since no kernel writes them (they are written at load
        time), so that they stream in while that kernel ends; x's after it."""
        for buffer in gl.static_range(STAGES):
            mbarrier.init(ready.index(buffer), count=1)
        for step in gl.static_range(STAGES - 1):
            _load_weights(x_desc, w_desc, s_desc, z_desc, w_bufs, s_bufs, z_bufs, ready, step, steps, first, off_n,
                          GROUP, HAS_ZEROS, STAGES, FRAGMENTS)
        wait_for_previous(PDL)
        for step in gl.static_range(STAGES - 1):
            _load_inputs(x_desc, x_bufs, ready, step, steps, first, off_m, STAGES)

    @gluon.jit
    def load_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, step, steps, first, off_m,
                  off_n, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, STAGES: gl.constexpr,
                  FRAGMENTS: gl.constexpr = False):
        """Step `step`'s x tile, words (K-major words [8, BLOCK_N], or FRAGMENTS: `w4_fragments`' words
        [BLOCK_N / 2, 16]), scales and zero points (K block first + step) into buffer step % STAGES, if
        the program has such a step."""
        _load_weights(x_desc, w_desc, s_desc, z_desc, w_bufs, s_bufs, z_bufs, ready, step, steps, first, off_n, GROUP,
                      HAS_ZEROS, STAGES, FRAGMENTS)
        _load_inputs(x_desc, x_bufs, ready, step, steps, first, off_m, STAGES)

    @gluon.jit
    def _load_weights(x_desc, w_desc, s_desc, z_desc, w_bufs, s_bufs, z_bufs, ready, step, steps, first, off_n,
                      GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, STAGES: gl.constexpr, FRAGMENTS: gl.constexpr):
        """`load_step`'s words, scales and zero points, under a barrier that expects x's tile too."""
        slot = step % STAGES
        present = step < steps
        nbytes: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes + s_desc.block_type.nbytes
                                + (z_desc.block_type.nbytes if HAS_ZEROS else 0))
        ready_slot = ready.index(slot)
        mbarrier.expect(ready_slot, nbytes, pred=present)
        block = first + step
        group = block * _STEP // GROUP
        if FRAGMENTS:
            tma_load(w_desc, [off_n // 2, block * (_STEP // 4)], ready_slot, w_bufs.index(slot), pred=present)
        else:
            tma_load(w_desc, [block * (_STEP // 8), off_n], ready_slot, w_bufs.index(slot), pred=present)
        tma_load(s_desc, [group, off_n], ready_slot, s_bufs.index(slot), pred=present)
        if HAS_ZEROS:
            tma_load(z_desc, [group, off_n], ready_slot, z_bufs.index(slot), pred=present)

    @gluon.jit
    def _load_inputs(x_desc, x_bufs, ready, step, steps, first, off_m, STAGES: gl.constexpr):
        """`load_step`'s x tile."""
        slot = step % STAGES
        tma_load(x_desc, [off_m, (first + step) * _STEP], ready.index(slot), x_bufs.index(slot), pred=step < steps)

    @gluon.jit
    def _w4_kernel(x_desc, w_desc, s_desc, z_desc, y_ptr, ws_ptr, arrivals_ptr, M, N, K, GROUP: gl.constexpr,
                   HAS_ZEROS: gl.constexpr, SPLIT: gl.constexpr, PENDING: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
        """y^T [BLOCK_N outputs, BLOCK_M tokens] = W x^T over this program's share of K's steps
        (program_id(2) of num_programs(2)); a step's wgmma left in flight while the next step's
        weights are made (its tile the other of two)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        off_n, off_m, first, steps = tile_and_share(K, BLOCK_M, BLOCK_N)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        w_tiles = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, _STEP],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_N, _STEP], gl.float16))
        x_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, _STEP], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, _STEP // 8, BLOCK_N], w_desc.layout)
        s_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, 1, BLOCK_N], s_desc.layout)
        # (symmetric: one slot never written, z_desc being the scales' descriptor)
        z_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES if HAS_ZEROS else 1, 1, z_desc.block_type.shape[1]],
                                           z_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        start_ring(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, steps, first, off_m, off_n,
                   GROUP, HAS_ZEROS, STAGES, PDL)

        # the first step before the loop (every share has one, `grid`): a loop that might not run would
        # leave ptxas a path on which the accumulator is set apart from the wgmmas, and for it ptxas waits
        # for each wgmma as soon as it is issued
        acc = _w4_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, w_tiles, ready,
                       gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma), 0, steps, first, off_m, off_n, GROUP, HAS_ZEROS,
                       STAGES, num_warps)
        for step in range(1, steps):
            acc = _w4_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, w_tiles, ready, acc, step,
                           steps, first, off_m, off_n, GROUP, HAS_ZEROS, STAGES, num_warps)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for buffer in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(buffer))

        write_tile(y_ptr, ws_ptr, arrivals_ptr, acc, off_m, off_n, M, N, SPLIT, PENDING, num_warps)

    @gluon.jit
    def _w4_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, w_tiles, ready, acc, step, steps,
                 first, off_m, off_n, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, STAGES: gl.constexpr,
                 num_warps: gl.constexpr):
        """Step `step` of `_w4_kernel`: its weights made into tile step % 2, its wgmma issued and left in
        flight once step - 1's is done, then step + STAGES - 1's loads issued into the buffer that frees."""
        BLOCK_N: gl.constexpr = acc.shape[0]
        # words [BLOCK_N, 8]: consecutive lanes, consecutive outputs; a thread's word makes 8 weights in a row
        made: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 8], threads_per_warp=[32, 1, 1],
                                              warps_per_cta=[1, num_warps, 1], order=[2, 0, 1])
        words_layout: gl.constexpr = gl.SliceLayout(2, made)
        n_layout: gl.constexpr = gl.SliceLayout(1, words_layout)
        # a row [1, BLOCK_N] of scales or zero points as n_layout holds it (outputs over lanes, every warp alike)
        row_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32],
                                                    warps_per_cta=[num_warps, 1], order=[1, 0])
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        words = w_bufs.index(slot).permute((1, 0)).load(words_layout)
        scale = gl.convert_layout(gl.reshape(s_bufs.index(slot).load(row_layout), [BLOCK_N]), n_layout)
        if HAS_ZEROS:
            zero = gl.convert_layout(gl.reshape(z_bufs.index(slot).slice(0, BLOCK_N, dim=1).load(row_layout),
                                                [BLOCK_N]), n_layout).to(gl.float16) + 1024.0
        else:
            zero = gl.full([BLOCK_N], 1032.0, gl.float16, n_layout)  # 1024 + the symmetric grid's zero, 8
        w = gl.inline_asm_elementwise(asm=_DEQUANTIZE, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                                      args=[words, zero[:, None], scale[:, None]], dtype=(gl.float16,) * 8,
                                      is_pure=True, pack=1)
        # [BLOCK_N, 8, 2, 2, 2], [..., a, b, c] = w[4 a + 2 b + c]: the word's weights in order
        weights = gl.join(gl.join(gl.join(w[0], w[4]), gl.join(w[2], w[6])),
                          gl.join(gl.join(w[1], w[5]), gl.join(w[3], w[7])))
        tile = w_tiles.index(step % 2)
        tile.store(weights.reshape([BLOCK_N, _STEP]))
        fence_async_shared()
        cta_barrier()  # every thread's weights are in before the wgmma reads them
        acc = warpgroup_mma(tile, x_bufs.index(slot).permute((1, 0)), acc, is_async=True)
        # step - 1's wgmma is done: its weight tile and its buffer (the slot of step + STAGES - 1) are free
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        load_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, step + STAGES - 1, steps,
                  first, off_m, off_n, GROUP, HAS_ZEROS, STAGES)
        return acc

    @gluon.jit
    def write_tile(y_ptr, ws_ptr, arrivals_ptr, acc, off_m, off_n, M, N, SPLIT: gl.constexpr, PENDING: gl.constexpr,
                   num_warps: gl.constexpr):
        """quant_matmul's `_write` for a tile y^T [BLOCK_N outputs from off_n, BLOCK_M tokens from off_m]:
        stored; split along K, added into the float32 workspace, whose last program to arrive writes y
        and zeroes its part and count for the next launch; or PENDING, added into the caller's sums (the
        workspace here). The tile goes to one output a lane first (through shared memory, once), so that
        a warp's writes and atomics are 128 bytes of one token's outputs: in the wgmma's layout a
        warp's are 8 outputs of 4 tokens, and in `w4_fragments`' order those 8 are 8 bytes apart, half
        of each sector unused (its pending sums of 64 tokens took 17-22% less time with this, H200,
        kernels_h200.md "Version 15"; for this kernel's own tiles the change was not timed apart). (The
        sums are exchanged as float32, which Gluon's Tritons take; the Triton kernel exchanges int32
        words, which any Triton takes.)"""
        BLOCK_N: gl.constexpr = acc.shape[0]
        BLOCK_M: gl.constexpr = acc.shape[1]
        outputs: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                                 warps_per_cta=[1, num_warps], order=[0, 1])
        acc = gl.convert_layout(acc, outputs)
        outs = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, outputs))
        tokens = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, outputs))
        offsets = tokens.to(gl.int64)[None, :] * N + outs[:, None]
        mask = (tokens < M)[None, :] & (outs < N)[:, None]
        if SPLIT or PENDING:
            gl.atomic_add(ws_ptr + offsets, acc, mask=mask, sem="relaxed")
        if SPLIT:
            cta_barrier()  # every thread's share is in before one thread moves the count (acq_rel)
            counter = arrivals_ptr + gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
            if gl.atomic_add(counter, 1) == gl.num_programs(2) - 1:
                total = gl.atomic_xchg(ws_ptr + offsets, gl.zeros_like(acc), mask=mask, sem="relaxed")
                gl.store(y_ptr + offsets, total.to(y_ptr.dtype.element_ty), mask=mask)
                gl.atomic_xchg(counter, 0)
        elif not PENDING:
            gl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)

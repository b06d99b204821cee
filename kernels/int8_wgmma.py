"""The int8 GEMM of W8A8 on Hopper, written in Gluon so that each wgmma stays in flight while the next
is issued.

Triton's own pipeliner keeps a wgmma asynchronous only when it accumulates in float32; an int8
product accumulates in int32, so `tl.dot` waits for every one at once and the tensor cores drain
between iterations (int8_matmul's `_gemm_kernel`). Here the loop is written out: TMA copies of x's
and W's tiles into a ring of STAGES shared-memory buffers, each signalled by its mbarrier; the
wgmma of step i is issued, then the one of step i - 1 is waited for (at most one outstanding), and
only then is that step's buffer refilled with the tile STAGES - 1 steps ahead. The epilogue is
int8_matmul's: y = sums * token scale * channel scale (+ bias) in float32, cast to y's dtype.

Runs on compute capability 9.x with a Triton that has Gluon's Hopper module, 3.6 or later (compiled
for sm_90 with 3.6 and 3.9 in the tests); `available` says whether this one does. Both operands
are [rows, K] with K contiguous, as wgmma wants 8-bit operands; TMA needs rows 16-byte aligned
(int8_matmul's K_MULTIPLE) and fills tiles past the edges with zeros, so no masks are needed in the
loop. The sums are exact: the result equals `int8_matmul.reference` up to the float32 epilogue's
rounding, as `_gemm_kernel`'s does. The epilogue is int8_matmul's `_scale_and_store` written again
in Gluon, whose tensors carry their layouts.
"""

from __future__ import annotations

import torch

from qtool.kernels import gluon_hopper
from qtool.kernels.gluon_hopper import (cta_barrier, descriptor, gl, gluon, mbarrier, tma_load, triton, warpgroup_mma,
                                        warpgroup_mma_wait)
from qtool.kernels.quant_matmul import _workspace

INT8_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)  # wgmma's n for 8-bit inputs


available = gluon_hopper.available


def launch(codes: torch.Tensor, scales: torch.Tensor, weight_codes: torch.Tensor, weight_scales: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor, config: dict) -> None:
    """out [M, N] = the product of int8 `codes` [M, K] (token `scales` [M, 1]) by `weight_codes`
    [N, K] (channel `weight_scales` [N]), with `config`'s BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
    num_stages, num_warps and GROUP_M."""
    if config["num_stages"] < 2:
        raise ValueError(f"the wgmma GEMM keeps a ring of at least 2 buffers, got num_stages={config['num_stages']}")
    (m, k), n = codes.shape, weight_codes.shape[0]
    block_m, block_n, block_k, split = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["SPLIT_K"]
    a_desc = descriptor(codes, [block_m, block_k])
    w_desc = descriptor(weight_codes, [block_n, block_k])
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    partials, arrivals = _workspace(codes.device, m * n * split if split > 1 else 1, tiles if split > 1 else 1,
                                    use="int8 partials")
    _wgmma_gemm_kernel[(tiles, split)](
        a_desc, w_desc, scales, weight_scales, weight_scales if bias is None else bias, out,
        partials.view(torch.int32), arrivals, m, n, k, HAS_BIAS=bias is not None, SPLIT=split > 1,
        GROUP_M=config.get("GROUP_M", 8), STAGES=config["num_stages"], num_warps=config["num_warps"])


if gluon is not None:
    @gluon.constexpr_function
    def _warps_per_cta(block_m, num_warps):
        """Warpgroups stacked along M while the tile has rows for them (16 rows a warp), then along N."""
        along_m = min(num_warps, max(4, block_m // 16))
        return [along_m, num_warps // along_m]

    @gluon.constexpr_function
    def _instr_n(block_n, num_warps, block_m):
        """The largest n of an 8-bit wgmma that divides a warpgroup's share of the tile's columns."""
        along_n = _warps_per_cta(block_m, num_warps)[1]
        return next(n for n in INT8_N if (block_n // along_n) % n == 0)

    @gluon.jit
    def _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, step, steps, first, off_m, off_n, STAGES: gl.constexpr):
        """The tiles of x and W of this program's step `step` (K block first + step) into buffer
        step % STAGES, if the program has such a step."""
        slot = step % STAGES
        block_k: gl.constexpr = a_desc.block_type.shape[1]
        present = step < steps
        mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=present)
        tma_load(a_desc, [off_m, (first + step) * block_k], ready.index(slot), a_bufs.index(slot), pred=present)
        tma_load(w_desc, [off_n, (first + step) * block_k], ready.index(slot), w_bufs.index(slot), pred=present)

    @gluon.jit
    def _wgmma_gemm_kernel(a_desc, w_desc, sa_ptr, sw_ptr, bias_ptr, y_ptr, ws_ptr, arrivals_ptr, M, N, K,
                           HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                           num_warps: gl.constexpr):
        """A [BLOCK_M, BLOCK_N] tile of y over this program's share of K's blocks (program_id(1) of
        num_programs(1)). Split, each share stores its int32 sums into its own slice of the workspace
        and the last to arrive adds the others' to its own and applies the epilogue (plain stores and
        loads through L2: no atomics on the sums)."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        # tiles in groups of GROUP_M tile rows, column by column within a group (rows of x and columns
        # of W shared in L2 by programs running together), as int8_matmul's `_tile`
        pid = gl.program_id(0)
        tiles_n = gl.cdiv(N, BLOCK_N)
        first_row = pid // (GROUP_M * tiles_n) * GROUP_M
        size = gl.minimum(gl.cdiv(M, BLOCK_M) - first_row, GROUP_M)
        inside = pid % (GROUP_M * tiles_n)
        off_m = (first_row + inside % size) * BLOCK_M
        off_n = inside // size * BLOCK_N
        blocks = gl.cdiv(K, BLOCK_K)
        share = gl.cdiv(blocks, gl.num_programs(1))
        first = gl.program_id(1) * share
        steps = gl.minimum(share, blocks - first)

        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_M, num_warps),
            instr_shape=[16, _instr_n(BLOCK_N, num_warps, BLOCK_M), 32])
        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for buffer in gl.static_range(STAGES):
            mbarrier.init(ready.index(buffer), count=1)

        for step in gl.static_range(STAGES - 1):
            _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, step, steps, first, off_m, off_n, STAGES)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout)
        for step in range(steps):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), w_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            # step - 1's wgmma is done: its buffer (the slot of step + STAGES - 1) may be refilled
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, step + STAGES - 1, steps, first, off_m, off_n, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for buffer in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(buffer))

        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        in_m, in_n = rows < M, cols < N
        mask = in_m[:, None] & in_n[None, :]
        offsets = rows.to(gl.int64)[:, None] * N + cols[None, :]  # of y, and of each share's slice of the workspace
        if SPLIT:
            gl.store(ws_ptr + gl.program_id(1).to(gl.int64) * M * N + offsets, acc, mask=mask)
            cta_barrier()  # every thread's sums are stored before one thread counts the arrival (acq_rel)
            arrived = gl.atomic_add(arrivals_ptr + pid, 1)
            if arrived == gl.num_programs(1) - 1:
                for other in range(gl.num_programs(1)):
                    if other != gl.program_id(1):
                        acc += gl.load(ws_ptr + other.to(gl.int64) * M * N + offsets, mask=mask, other=0,
                                       cache_modifier=".cg")
                gl.store(arrivals_ptr + pid, 0)
                _scale_and_store(acc, rows, in_m, cols, in_n, mask, offsets, sa_ptr, sw_ptr, bias_ptr, y_ptr, HAS_BIAS)
        else:
            _scale_and_store(acc, rows, in_m, cols, in_n, mask, offsets, sa_ptr, sw_ptr, bias_ptr, y_ptr, HAS_BIAS)

    @gluon.jit
    def _scale_and_store(sums, rows, in_m, cols, in_n, mask, offsets, sa_ptr, sw_ptr, bias_ptr, y_ptr,
                         HAS_BIAS: gl.constexpr):
        """int8_matmul's epilogue: y = sums * token scale * channel scale (+ bias) in float32."""
        token = gl.load(sa_ptr + rows, mask=in_m, other=0.0)
        channel = gl.load(sw_ptr + cols, mask=in_n, other=0.0)
        out = sums.to(gl.float32) * token[:, None] * channel[None, :]
        if HAS_BIAS:
            out += gl.load(bias_ptr + cols, mask=in_n, other=0.0).to(gl.float32)[None, :]
        gl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)

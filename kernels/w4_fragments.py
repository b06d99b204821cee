"""4-bit products of a few to a few hundred tokens on Hopper with the weights going into the wgmma from
registers: no shared-memory weight tile, fence or barrier a step.

`w4_wgmma`'s kernel makes each step's fp16 weights in registers, stores them into a shared-memory
tile, fences and waits for every warp before its wgmma reads them; ncu found it issue-bound
(kernels_h200.md, "Version 14"). wgmma takes its first operand from registers too, as fragments:
of each 16x16 block, thread 4r + t of a warp holds rows r and r + 8, inputs 2t, 2t + 1, 2t + 8 and
2t + 9. So the codes are laid out once, at load time, in exactly that order (`fragment_words`: a
second copy of the codes, N * K / 2 bytes, 3.5 GB for Llama-3-8B's linears): a thread's 32-bit word
is its 8 weights of one block, which `DEQUANTIZE` (LOP3 to 1024 + q, HSUB2 1024 + z, HMUL2 s: exact,
then one rounding, as `quant_matmul.reference` rounds W) turns into its 4 half2 registers of the
fragment. A block's rows r and r + 8 hold outputs 2r and 2r + 1 of its 16, so each thread's two rows
take a neighbouring pair of scales and zero points, read from the checkpoint's rows as they are.

A step is 64 inputs; x's tile, the words, the group's scales and zero points arrive by TMA into a
ring of STAGES buffers under one mbarrier, issued STAGES - 1 steps ahead (as in `w4_wgmma`), and
each wgmma (W [BLOCK_N, 64] from registers times x^T: the tokens are the wgmma's n, 8-256 of them,
in one warpgroup or two) is, in tiles of 64 tokens or more, left in flight while the next step's
weights are made (its weights held in their registers until then). On an H200 (benchmarks/results/
kernels_h200.md, "Version 16") the tuner takes it at 4-256 tokens on Llama-3-8B's shapes but
4096x1024 at 128 tokens.

Takes (`fits`): what `w4_wgmma` takes, with N a multiple of 16 and K of 16 (whole 16x16 blocks), and
the weight's fragment words (`KernelWeight.fragments`, `quant_matmul.with_fragments`).
"""

from __future__ import annotations

import torch

from qtool.kernels import gluon_hopper, w4_wgmma
from qtool.kernels.gluon_hopper import descriptor, gl, gluon, mbarrier, warpgroup_mma, warpgroup_mma_wait

STEP = w4_wgmma.STEP  # inputs a step
BLOCK = 16  # a fragment's block: 16 outputs x 16 inputs, a word a thread of a warp


def fragment_words(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0-15) -> words [N / 2, K / 4] int32, each thread's A fragment of a 16x16 block.
    Output n = 16 b + 2 r + h, input k = 16 c + 8 e + 2 t + d: word (8 b + r, 4 c + t) holds the code
    at nibble p + 4 d, p = h + 2 e (the order `DEQUANTIZE` makes its half2 pairs in)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // 16, 8, 2, k // 16, 2, 4, 2)  # b, r, h, c, e, t, d
    c = c.permute(0, 1, 3, 5, 6, 4, 2)  # b, r, c, t, d, e, h: nibble h + 2 e + 4 d
    # in bytes (a byte a code while they move: the codes of a joined gate/up are 117M), two nibbles a
    # byte, four bytes a little-endian word
    c = c.reshape(n // 2, k // 4, 4, 2)
    return (c[..., 0] | c[..., 1] << 4).contiguous().view(torch.int32).squeeze(-1)


def fits(weight, dtype: torch.dtype) -> bool:
    """Whether the kernel computes products of this weight by activations of `dtype`: what
    `w4_wgmma.fits` asks (N a multiple of 16 among it), and K in whole blocks of 16 inputs (its
    fragment words then made by `fragment_words`, rows of K bytes: 16-byte aligned, as TMA reads them)."""
    return w4_wgmma.fits(weight, dtype) and weight.in_features % BLOCK == 0


def takes(weight, dtype: torch.dtype) -> bool:
    """Whether the kernel runs this product here: on compute capability 9.x with Gluon, for a weight
    it fits whose fragment words are there, as `fragment_words` makes them (int32 [N / 2, K / 4],
    contiguous, 16-byte aligned)."""
    words = weight.fragments
    return (words is not None and words.dtype == torch.int32 and words.is_contiguous() and words.data_ptr() % 16 == 0
            and tuple(words.shape) == (weight.out_features // 2, weight.in_features // 4)
            and gluon_hopper.runs_on(weight.packed.device) and fits(weight, dtype))


def _dequantize_ptx() -> str:
    """A word ($8) -> its 8 weights ($0-$7: pairs p = h + 2 e of inputs d = 0, 1), given 1024 + the zero
    of rows h = 0 and 1 ($9, $10) and their scales ($11, $12) in fp16: pair p is nibbles p and p + 4,
    taken under fp16's exponent into the halves of a half2 by one LOP3."""
    lines = [".reg .b32 t, a, z0, z1, s0, s1;", "mov.b32 z0, {$9, $9};", "mov.b32 z1, {$10, $10};",
             "mov.b32 s0, {$11, $11};", "mov.b32 s1, {$12, $12};"]
    for pair in range(4):
        if pair:
            lines.append(f"shr.u32 a, $8, {4 * pair};")
        row = pair % 2
        lines += [f"lop3.b32 t, {'a' if pair else '$8'}, 0x000f000f, 0x64006400, 0xea;", f"sub.rn.f16x2 t, t, z{row};",
                  f"mul.rn.f16x2 t, t, s{row};", f"mov.b32 {{${2 * pair}, ${2 * pair + 1}}}, t;"]
    return "{\n" + "\n".join(lines) + "\n}"


DEQUANTIZE = _dequantize_ptx()
# the kernel's way from a word's 8 values to the fragments' rows, written out in `_fragments_step`
# (Triton 3.6 takes no tuple constants there) and run in torch by tests/kernels/test_w4_fragments.py,
# which checks the kernel's text names these: the values ($0-$7) in the order nested joins take them,
# ((0 4) (2 6)) ((1 5) (3 7)), so that the joined axes are e, h, d; the words' [b, r, c, t] and those as
# [b, h, r, c, e, t, d]: row 16 b + 8 h + r, input 16 c + 8 e + 2 t + d; and the accumulator's rows
# [b, h, r] as [b, r, h]: output 16 b + 2 r + h
JOINED = (0, 4, 2, 6, 1, 5, 3, 7)
FRAGMENT_ORDER = (0, 5, 1, 2, 4, 3, 6)
OUTPUT_ORDER = (0, 2, 1, 3)


def launch(x: torch.Tensor, weight, config: dict, group: int, out: torch.Tensor, workspace: torch.Tensor,
           arrivals: torch.Tensor, pending: bool) -> None:
    """x [M, K] (contiguous, 16-byte aligned) @ W^T from `weight.fragments`, with `config`'s BLOCK_M,
    BLOCK_N, SPLIT_K, num_stages and num_warps on `w4_wgmma.grid`; the rest as `w4_wgmma.launch`."""
    block_m, block_n, split, warps = config["BLOCK_M"], config["BLOCK_N"], config["SPLIT_K"], config["num_warps"]
    # a ring of 2+ buffers; one or two warpgroups, a warp's 16 rows of each wgmma, whole rows of zero
    # points of 128 bytes; the tokens as the wgmma's n
    if (config["num_stages"] < 2 or split < 1 or warps not in (4, 8) or block_n not in (64, 128, 256)
            or block_n < 16 * warps or block_m not in (8, 16, 32, 64, 128, 256)):
        raise ValueError(f"the W4 fragments kernel takes num_stages >= 2, SPLIT_K >= 1, 4 or 8 warps, BLOCK_N 64, 128 "
                         f"or 256 (16 a warp at least) and BLOCK_M 8-256 (a power of two), got {config}")
    w4_wgmma.start(_fragments_kernel, descriptors(x, weight, block_m, block_n), x, weight, config, group, out,
                   workspace, arrivals, pending)


def descriptors(x: torch.Tensor, weight, block_m: int, block_n: int) -> tuple:
    """The kernel's TMA descriptors: x's tiles, the fragment words', rows of scales and of zero points
    (as `w4_wgmma.descriptors`)."""
    return (descriptor(x, [block_m, STEP]), *weight.remembered(
        ("w4_fragments", block_n), lambda: (descriptor(weight.fragments, [block_n // 2, STEP // 4]),
                                            *w4_wgmma.group_descriptors(weight, block_n))))


if gluon is not None:
    from qtool.kernels.w4_wgmma import load_step, start_ring, tile_and_share, write_tile

    _DEQUANTIZE = gl.constexpr(DEQUANTIZE)
    # the fewest tokens a tile for which a step's wgmma stays in flight while the next step's weights are
    # made: faster from 64 tokens, slower for 4-32 (up to 30% more time, 4096x14336 at 4 tokens;
    # kernels_h200.md "Version 16")
    _IN_FLIGHT_FROM = gl.constexpr(64)
    _STEP = gl.constexpr(STEP)

    @gluon.jit
    def _fragments_kernel(x_desc, w_desc, s_desc, z_desc, y_ptr, ws_ptr, arrivals_ptr, M, N, K, GROUP: gl.constexpr,
                          HAS_ZEROS: gl.constexpr, SPLIT: gl.constexpr, PENDING: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
        """y^T [BLOCK_N outputs (in the fragments' order), BLOCK_M tokens] = W x^T over this program's
        share of K's steps (program_id(2) of num_programs(2)); in tiles of 64 tokens or more a step's
        wgmma left in flight while the next step's weights are made."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        Z_WIDTH: gl.constexpr = z_desc.block_type.shape[1]  # at least 128 bytes (`w4_wgmma.group_descriptors`)
        off_n, off_m, first, steps = tile_and_share(K, BLOCK_M, BLOCK_N)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        fragment: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        x_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, _STEP], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N // 2, _STEP // 4], w_desc.layout)
        s_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, 1, BLOCK_N], s_desc.layout)
        # (symmetric: one slot never written, z_desc being the scales' descriptor)
        z_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES if HAS_ZEROS else 1, 1, Z_WIDTH], z_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        start_ring(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, steps, first, off_m, off_n,
                   GROUP, HAS_ZEROS, STAGES, PDL, FRAGMENTS=True)

        # the first step before the loop, as in `w4_wgmma._w4_kernel` (ptxas then keeps the wgmmas in flight);
        # then two steps a turn: a wgmma reads its weights from registers until it is done, so each step
        # holds the one before's weights to its wait, and the two steps of a turn make theirs in
        # different registers (one step a turn made each step's weights in the registers the wgmma
        # before was still reading: wrong sums once three steps overlapped, H200)
        acc, held = _fragments_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready,
                                    gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma),
                                    gl.zeros([BLOCK_N, _STEP], gl.float16, fragment), 0, steps, first, off_m, off_n,
                                    GROUP, HAS_ZEROS, STAGES, num_warps)
        for step in range(1, steps - 1, 2):
            acc, other = _fragments_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, acc,
                                         held, step, steps, first, off_m, off_n, GROUP, HAS_ZEROS, STAGES, num_warps)
            acc, held = _fragments_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, acc,
                                        other, step + 1, steps, first, off_m, off_n, GROUP, HAS_ZEROS, STAGES,
                                        num_warps)
        if steps % 2 == 0:
            acc, held = _fragments_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, acc,
                                        held, steps - 1, steps, first, off_m, off_n, GROUP, HAS_ZEROS, STAGES,
                                        num_warps)
        acc, held = warpgroup_mma_wait(num_outstanding=0, deps=(acc, held))
        for buffer in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(buffer))

        # the fragments' row 16 b + 8 h + r is output 16 b + 2 r + h: in the outputs' order
        acc = acc.reshape([BLOCK_N // 16, 2, 8, BLOCK_M]).permute((0, 2, 1, 3)).reshape([BLOCK_N, BLOCK_M])
        write_tile(y_ptr, ws_ptr, arrivals_ptr, acc, off_m, off_n, M, N, SPLIT, PENDING, num_warps)

    @gluon.jit
    def _fragments_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, acc, held, step, steps,
                        first, off_m, off_n, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, STAGES: gl.constexpr,
                        num_warps: gl.constexpr):
        """Step `step` of `_fragments_kernel`: its weights made in registers, its wgmma issued and (tiles
        of _IN_FLIGHT_FROM tokens or more) left in flight once step - 1's (which read `held`, kept alive
        to then) is done, then step + STAGES - 1's loads issued into the buffer that frees. Returns the
        sums and this step's weights."""
        BLOCK_N: gl.constexpr = acc.shape[0]
        Z_WIDTH: gl.constexpr = z_desc.block_type.shape[1]  # at least 128 bytes (`w4_wgmma.group_descriptors`)
        mma: gl.constexpr = acc.type.layout
        fragment: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        # words [BLOCK_N / 2, 16]: lane 4 r + t holds word (8 b + r, 4 c + t), warps over b, the 4 c in registers
        words_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[8, 4],
                                                      warps_per_cta=[num_warps, 1], order=[1, 0])
        pairs_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 2], threads_per_warp=[8, 4],
                                                      warps_per_cta=[num_warps, 1], order=[1, 0])
        rows_layout: gl.constexpr = gl.SliceLayout(1, words_layout)
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        words = w_bufs.index(slot).load(words_layout)
        scale0, scale1 = gl.split(s_bufs.index(slot).reshape([BLOCK_N // 2, 2]).load(pairs_layout))
        scale0 = gl.convert_layout(scale0, rows_layout)
        scale1 = gl.convert_layout(scale1, rows_layout)
        if HAS_ZEROS:
            # the row's pairs, then the tile's (Triton 3.6 reshapes no slice)
            zeros = z_bufs.index(slot).reshape([Z_WIDTH // 2, 2]).slice(0, BLOCK_N // 2, dim=0).load(pairs_layout)
            zero0, zero1 = gl.split(zeros.to(gl.float16) + 1024.0)
            zero0 = gl.convert_layout(zero0, rows_layout)
            zero1 = gl.convert_layout(zero1, rows_layout)
        else:
            zero0 = gl.full([BLOCK_N // 2], 1032.0, gl.float16, rows_layout)  # 1024 + the symmetric grid's zero, 8
            zero1 = zero0
        w = gl.inline_asm_elementwise(asm=_DEQUANTIZE, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h,h,h",
                                      args=[words, zero0[:, None], zero1[:, None], scale0[:, None], scale1[:, None]],
                                      dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        # [R, C, e, h, d] = w[4 e + 2 h + d]
        v = gl.join(gl.join(gl.join(w[0], w[4]), gl.join(w[2], w[6])),
                    gl.join(gl.join(w[1], w[5]), gl.join(w[3], w[7])))
        v = v.reshape([BLOCK_N // 16, 8, 4, 4, 2, 2, 2])  # b, r, c, t, e, h, d
        v = v.permute((0, 5, 1, 2, 4, 3, 6))  # b, h, r, c, e, t, d: the fragment's row 8 h + r, input k
        weights = gl.convert_layout(v.reshape([BLOCK_N, _STEP]), fragment)
        acc = warpgroup_mma(weights, x_bufs.index(slot).permute((1, 0)), acc, is_async=True)
        # step - 1's wgmma is done: its weights' registers and its buffer (the slot of step + STAGES - 1)
        # free; this step's too for tiles of few tokens
        if x_bufs.shape[1] >= _IN_FLIGHT_FROM:  # the tile's tokens
            acc, held = warpgroup_mma_wait(num_outstanding=1, deps=(acc, held))
        else:
            acc, held = warpgroup_mma_wait(num_outstanding=0, deps=(acc, held))
        load_step(x_desc, w_desc, s_desc, z_desc, x_bufs, w_bufs, s_bufs, z_bufs, ready, step + STAGES - 1, steps,
                  first, off_m, off_n, GROUP, HAS_ZEROS, STAGES, FRAGMENTS=True)
        return acc, weights

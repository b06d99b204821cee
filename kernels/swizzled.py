"""4-bit codes laid out so that tensor-core tiles of 16-128 tokens take their weights from registers.

qtool's tiles of a few tokens (`quant_matmul`, SWAP) dequantize words of codes into an fp16 tile
and hand it to the dot; on Hopper the tile goes through shared memory on its way (stores, a
barrier, loads), since Triton keeps that round trip for any chain from packed words to fp16 that
it cannot follow into the wgmma's register operand. Triton's own `triton_kernels` avoids it for
mxfp4 weights: it stores the codes in the order each thread will hold them, upcasts them by inline
PTX and puts them in place by join / reshape / trans alone, so that the layout Triton infers is
already the dot operand's. The same here for uniform 4-bit grids:

- `swizzle` rearranges the codes once, at load time, into bytes of two codes [N / 4, 2K], tiles of
  16 outputs x 128 inputs (two groups of 64) in the order `rearranged` (the kernel's chain, in
  torch) takes them: a second copy of the codes, N * K / 2 bytes, as large as the first;
- `swizzled_tile` loads a tile's bytes (16-byte loads, software-pipelined through shared memory
  by the caller's loop), makes 1024 + each code in fp16 (`UPCAST`: SHR, PRMT and LOP3, 9
  instructions a word of 8 codes) and rearranges them into the tile's two halves of 64 inputs,
  which the caller shifts by 1024 + zero and multiplies by the scale (exact, then one rounding,
  as the reference).

Compiled for sm_90, nothing is stored to shared memory between the codes' loads and the wgmma
(tests/kernels/test_sm90_compile.py). On an H200 (benchmarks/results/kernels_h200.md, Version 13)
it runs level with qtool's swapped half2 tiles at 8-16 tokens and 1-7% faster at 32-128 on the
larger Llama-3-8B shapes: the round trip was not most of what those tiles spend.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

TILE_K = 128  # inputs a tile: two groups of 64
TILE_N = 16  # outputs: the swizzle's unit (4 rows of bytes make 16 rows of weights)
MIN_GROUP = TILE_K // 2  # a tile's halves each take one scale and zero: inputs a half
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


def fits(out_features: int, in_features: int, bits: int, group_size: int) -> bool:
    """Whether codes of this shape and grid can be swizzled: 4-bit, whole tiles, power-of-two groups
    of at least a tile's half (or one a row), as the kernels take them."""
    whole_groups = group_size == -1 or group_size >= MIN_GROUP and group_size & (group_size - 1) == 0
    return bits == 4 and whole_groups and out_features % TILE_N == 0 and in_features % TILE_K == 0


def rearranged(values: torch.Tensor) -> torch.Tensor:
    """The kernel's chain on a tile, in torch: [R, 256, 2] (each byte's low and high code) -> the
    weights [4R, 128], outputs by inputs."""
    rows, width, _ = values.shape
    values = values.reshape(rows, width // 4, 4, 2).permute(0, 1, 3, 2).reshape(rows, width * 2)
    rows, width = values.shape
    values = values.reshape(rows // 4, 4, width // 256, 2, 4, 8, 2, 2).permute(0, 6, 1, 3, 2, 5, 4, 7)
    return values.reshape(rows * 4, width // 4)


def swizzle(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0-15) -> bytes [N / 4, 2K]: the tile of outputs [16 t, 16 t + 16) and inputs
    [128 j, 128 j + 128) at rows [4 t, 4 t + 4) and columns [256 j, 256 j + 256), each byte's two
    codes where `rearranged` takes them. A tile of 16 b outputs is b such tiles one under another:
    the kernel's blocks of outputs read the one layout."""
    n, k = codes.shape
    codes = codes.to(torch.uint8)  # a byte a code while they are rearranged (int64 codes of a large layer: GBs)
    rows, width = TILE_N // 4, 2 * TILE_K
    slots = rearranged(torch.arange(rows * width * 2, device=codes.device).reshape(rows, width, 2)).flatten()
    tiles = codes.reshape(n // TILE_N, TILE_N, k // TILE_K, TILE_K).permute(0, 2, 1, 3)
    tiles = tiles.reshape(n // TILE_N, k // TILE_K, -1)[..., torch.argsort(slots)]
    packed = (tiles[..., 0::2] | tiles[..., 1::2] << 4).to(torch.uint8)
    return packed.reshape(n // TILE_N, k // TILE_K, rows, width).permute(0, 2, 1, 3).reshape(n // 4, 2 * k).contiguous()


if triton is not None:
    _UPCAST = tl.constexpr(UPCAST)
    _TILE_K = tl.constexpr(TILE_K)

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
    def swizzled_tile(t_ptr, start, rows, in_rows, K, ASM: tl.constexpr):
        """1024 + the codes of outputs [4 rows[0], 4 rows[-1] + 4) and inputs [start, start + 128) in
        fp16: two halves of 64 inputs, [4 len(rows), 64] each (outputs past `in_rows` read 0)."""
        columns = tl.arange(0, 2 * _TILE_K)
        codes = tl.load(t_ptr + rows[:, None] * (2 * K) + (2 * start + columns)[None, :], mask=in_rows[:, None],
                        other=0)
        values = _rearrange(_upcast(codes, ASM))
        return values.reshape(values.shape[0], 2, _TILE_K // 2).trans(0, 2, 1).split()

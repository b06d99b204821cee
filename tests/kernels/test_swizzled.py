"""The swizzled layout of 4-bit codes (`qtool.kernels.swizzled`): its upcast PTX (through
`ptx_model`) and its load-time swizzle, undone exactly by `rearranged` (the kernel's chain in
torch). That the kernel's chain is the same is what the products over the layout test, with the
others (test_quant_matmul.py)."""

import numpy as np
import torch

from ptx_model import _halves, run  # beside this file (pytest puts its folder on the path)
from qtool.kernels import swizzled


def test_the_upcast_makes_1024_plus_each_code_of_four_bytes_in_order():
    rng = np.random.default_rng(0)
    for _ in range(100):
        data = rng.integers(0, 256, 4)
        written = run(swizzled.UPCAST, {4: int(data[0] | data[1] << 8 | data[2] << 16 | data[3] << 24)})
        values = [float(half) for register in range(4) for half in _halves(written[register])]
        assert values == [1024 + int(byte) % 16 for byte in data] + [1024 + int(byte) // 16 for byte in data]


def test_the_kernel_chain_puts_every_swizzled_code_back_in_place():
    """Every tile of 16 outputs x 128 inputs, and a block of 64 outputs read as one tile (as the
    kernel's blocks of outputs read the layout)."""
    codes = torch.randint(0, 16, (128, 256), generator=torch.Generator().manual_seed(1))
    packed = swizzled.swizzle(codes)
    assert packed.shape == (32, 512) and packed.dtype == torch.uint8
    for rows in (4, 16):  # bytes of a tile of 16 outputs; of a block of 64
        for n in range(32 // rows):
            for k in range(2):
                tile = packed[n * rows:(n + 1) * rows, k * 256:(k + 1) * 256].long()
                rebuilt = swizzled.rearranged(torch.stack((tile % 16, tile // 16), dim=-1))
                assert torch.equal(rebuilt, codes[n * 4 * rows:(n + 1) * 4 * rows, k * 128:(k + 1) * 128])


def test_shapes_the_layout_takes():
    assert swizzled.fits(4096, 14336, 4, 64) and swizzled.fits(32, 256, 4, -1) and swizzled.fits(32, 256, 4, 128)
    assert not swizzled.fits(32, 256, 4, 32) and not swizzled.fits(32, 256, 4, 96)  # a half of a tile in two groups
    assert not swizzled.fits(32, 384, 4, 192)  # whole halves, but no power of two: the kernels take none
    assert not swizzled.fits(24, 256, 4, 64) and not swizzled.fits(32, 192, 4, 64) and not swizzled.fits(32, 256, 8, 64)

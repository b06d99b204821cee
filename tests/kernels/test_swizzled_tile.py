"""benchmarks/swizzled_tile.py, the experiment for 16-64 tokens: its upcast PTX (through `ptx_model`),
its load-time swizzle (undone exactly by the kernel's own chain) and its kernel against the
reference: under the interpreter here, compiled on a GPU."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ptx_model import _halves, run  # beside this file (pytest puts its folder on the path)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "swizzled_tile.py"
spec = importlib.util.spec_from_file_location("swizzled_tile", SCRIPT)
swizzled_tile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(swizzled_tile)


def test_the_upcast_makes_1024_plus_each_code_of_four_bytes_in_order():
    rng = np.random.default_rng(0)
    for _ in range(100):
        data = rng.integers(0, 256, 4)
        written = run(swizzled_tile.UPCAST, {4: int(data[0] | data[1] << 8 | data[2] << 16 | data[3] << 24)})
        values = [float(half) for register in range(4) for half in _halves(written[register])]
        assert values == [1024 + int(byte) % 16 for byte in data] + [1024 + int(byte) // 16 for byte in data]


@pytest.mark.parametrize("block_n", [64, 128])
def test_the_kernel_chain_puts_every_swizzled_code_back_in_place(block_n):
    codes = torch.randint(0, 16, (2 * block_n, 256), generator=torch.Generator().manual_seed(1))
    packed = swizzled_tile.swizzle(codes, block_n)
    assert packed.shape == (block_n // 2, 512) and packed.dtype == torch.uint8
    rows, width = block_n // 4, 256
    for n in range(2):
        for k in range(2):
            tile = packed[n * rows:(n + 1) * rows, k * width:(k + 1) * width].long()
            rebuilt = swizzled_tile.rearranged(torch.stack((tile % 16, tile // 16), dim=-1))
            assert torch.equal(rebuilt, codes[n * block_n:(n + 1) * block_n, k * 128:(k + 1) * 128])


@pytest.mark.parametrize("m, n, k, config", [(16, 128, 256, {}), (3, 128, 512, dict(split=2)),
                                             (20, 128, 256, dict(block_n=128)), (64, 64, 256, dict(block_m=64))])
def test_the_kernel_gives_the_reference_product(m, n, k, config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert swizzled_tile.relative_error(m, n, k, device, **config) < 2e-3

"""w4_fragments' Gluon kernel (Hopper only) against quant_matmul's reference; its layout and its
chain from words to the wgmma's fragments, in torch; its PTX on the CPU model; where it may be
offered."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from qtool.kernels import gluon_hopper, w4_fragments
from qtool.kernels.quant_matmul import candidates, triton_matmul, with_fragments

from ptx_model import _bits16, run  # beside this file (pytest puts its folder on the path)
from test_quant_matmul import DEVICE, check, uniform_weight
from test_w4_wgmma import check_every_output_written_from_unaligned_inputs, check_split_k_and_pending_sums

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9 and gluon_hopper.available()
on_hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on compute capability 9.x only")
FRAGMENTS = dict(WGMMA=True, FRAGMENTS=True, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, num_warps=4, num_stages=3)


def fragment_weight(n: int, k: int, group_size: int, symmetric: bool):
    weight = with_fragments(uniform_weight(n, k, 4, group_size, symmetric))
    assert weight.fragments is not None
    return weight


@on_hopper
@pytest.mark.parametrize("group_size, k", [(64, 320), (128, 384), (-1, 336)])  # one a row: a partial last step
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m, block_m", [(3, 8), (17, 32), (130, 128)])  # tokens past a tile; three tiles of 128
def test_the_kernel_matches_the_reference(group_size, k, symmetric, m, block_m):
    """Outputs 80 in tiles of 64 (the second masked)."""
    check(fragment_weight(80, k, group_size, symmetric), m, config=dict(FRAGMENTS, BLOCK_M=block_m))


@on_hopper
@pytest.mark.parametrize("stages, block_n", [(2, 64), (4, 128), (3, 256)])
def test_every_ring_and_tile_matches_the_reference(stages, block_n):
    check(fragment_weight(272, 640, 64, False), 20, config=dict(FRAGMENTS, BLOCK_N=block_n, num_stages=stages))


@on_hopper
def test_split_k_and_pending_sums():
    check_split_k_and_pending_sums(fragment_weight(64, 640, 64, False), FRAGMENTS)


@on_hopper
def test_every_output_is_written_and_unaligned_inputs_are_copied(monkeypatch):
    check_every_output_written_from_unaligned_inputs(fragment_weight(48, 256, 64, True), FRAGMENTS, monkeypatch)


@on_hopper
def test_weights_and_configurations_it_cannot_take_are_refused():
    x = torch.randn(16, 256, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="fragment words"):  # no fragment words
        triton_matmul(x, uniform_weight(32, 256, 4, 64, False), config=FRAGMENTS)
    for config in (dict(FRAGMENTS, num_stages=1), dict(FRAGMENTS, SPLIT_K=0), dict(FRAGMENTS, BLOCK_N=32),
                   dict(FRAGMENTS, num_warps=8), dict(FRAGMENTS, BLOCK_M=24)):
        with pytest.raises(ValueError, match="num_stages >= 2, SPLIT_K >= 1"):
            triton_matmul(x, fragment_weight(32, 256, 64, False), config=config)


def test_weights_it_fits_and_the_copy_it_needs():
    weight = uniform_weight(64, 256, 4, 64, False)
    assert w4_fragments.fits(weight, torch.float16)
    assert not w4_fragments.fits(uniform_weight(64, 264, 4, -1, False), torch.float16)  # K not whole blocks of 16
    assert not w4_fragments.fits(uniform_weight(40, 256, 4, 64, False), torch.float16)  # nor N
    assert not w4_fragments.fits(uniform_weight(64, 256, 4, 32, False), torch.float16)  # w4_wgmma's refusals
    made = with_fragments(weight)
    assert (made.fragments is not None) == HOPPER and not w4_fragments.takes(weight, torch.float16)
    words = replace(weight, fragments=w4_fragments.fragment_words(weight.codes()))
    copy = words.copy()
    assert copy.fragments.data_ptr() != words.fragments.data_ptr() and copy.nbytes == weight.nbytes  # read: one layout


def test_its_tiles_are_offered_for_3_to_256_tokens_of_fp16(monkeypatch):
    monkeypatch.setattr(gluon_hopper, "runs_on", lambda device: True)  # as on a Hopper GPU
    weight = uniform_weight(64, 256, 4, 64, False)
    assert not any(config.get("FRAGMENTS") for config in candidates(16, weight, torch.float16))  # no copy
    weight = replace(weight, fragments=w4_fragments.fragment_words(weight.codes()))
    for m, block_m in ((3, 8), (16, 16), (40, 64), (200, 128)):
        offered = [config for config in candidates(m, weight, torch.float16) if config.get("FRAGMENTS")]
        assert offered and all(config["BLOCK_M"] == block_m for config in offered)
    assert not any(config.get("FRAGMENTS") for m in (1, 2, 257) for config in candidates(m, weight, torch.float16))
    assert not any(config.get("FRAGMENTS") for config in candidates(40, weight, torch.bfloat16))


def kernel_chain(words: torch.Tensor) -> torch.Tensor:
    """The kernel's way from fragment words to the outputs' codes, in torch: DEQUANTIZE's 8 values of a
    word (pair p = h + 2 e of nibbles p and p + 4), joined, reshaped and permuted as the kernel does into
    the fragments' rows [N, K], whose row 16 b + 8 h + r is output 16 b + 2 r + h."""
    rows, columns = words.shape
    wide = words.to(torch.int64) & 0xFFFFFFFF
    made = [(wide >> (4 * (j // 2 + 4 * (j % 2)))) & 15 for j in range(8)]  # $j: pair j // 2, input j % 2

    def join(a, b):
        return torch.stack((a, b), -1)

    v = join(join(join(made[0], made[4]), join(made[2], made[6])), join(join(made[1], made[5]), join(made[3], made[7])))
    v = v.reshape(rows // 8, 8, columns // 4, 4, 2, 2, 2).permute(0, 5, 1, 2, 4, 3, 6).reshape(rows * 2, columns * 4)
    row = torch.arange(rows * 2)
    outs = row // 16 * 16 + row % 8 * 2 + row % 16 // 8
    codes = torch.empty_like(v)
    codes[outs] = v
    return codes


def test_the_kernel_chain_puts_every_code_at_its_output_and_input():
    codes = torch.randint(0, 16, (48, 192))
    assert torch.equal(kernel_chain(w4_fragments.fragment_words(codes)), codes)


def test_the_dequantization_ptx_makes_each_weight_as_the_reference_rounds_it():
    """w4_fragments.DEQUANTIZE run by the CPU model of PTX: value 2 p + d of a word is its nibble
    p + 4 d, less the zero of row h = p % 2, times that row's scale, rounded once to fp16."""
    generator = np.random.default_rng(0)
    for _ in range(200):
        word = int(generator.integers(0, 2**32))
        zeros = [int(z) for z in generator.integers(0, 16, 2)]
        scales = [np.float16(s) for s in generator.uniform(-0.05, 0.05, 2)]
        made = run(w4_fragments.DEQUANTIZE, {8: word, 9: _bits16(np.float16(1024 + zeros[0])),
                                             10: _bits16(np.float16(1024 + zeros[1])), 11: _bits16(scales[0]),
                                             12: _bits16(scales[1])})
        for j in range(8):
            pair, d = divmod(j, 2)
            code, h = (word >> (4 * (pair + 4 * d))) & 15, pair % 2
            expected = np.float16(np.float32(code - zeros[h]) * np.float32(scales[h]))
            assert made[j] == _bits16(expected), (word, zeros, scales, j)

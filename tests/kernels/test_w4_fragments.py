"""w4_fragments' Gluon kernel (Hopper only) against quant_matmul's reference; its layout and its
chain from words to the wgmma's fragments, in torch; its PTX on the CPU model; where it may be
offered."""

import inspect
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
    weight = with_fragments(uniform_weight(n, k, 4, group_size, symmetric), torch.float16)
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
@pytest.mark.parametrize("stages, block_n, warps, block_m", [(2, 64, 4, 16), (4, 128, 4, 16), (3, 256, 4, 16),
                                                            (4, 128, 8, 16), (3, 256, 8, 64), (3, 64, 4, 256),
                                                            (3, 128, 8, 256)])
def test_every_ring_and_tile_matches_the_reference(stages, block_n, warps, block_m):
    """One or two warpgroups, 16 to 256 tokens a tile."""
    config = dict(FRAGMENTS, BLOCK_N=block_n, num_stages=stages, num_warps=warps, BLOCK_M=block_m)
    check(fragment_weight(272, 640, 64, False), 20, config=config)
    check(fragment_weight(272, 640, 64, False), 300, config=config)


@on_hopper
def test_split_k_and_pending_sums():
    """Tiles that wait for each step's wgmma, and tiles in one or two warpgroups that leave it in flight
    (shares of 1-4 steps: the loop's first step alone, with a tail, with one whole turn)."""
    for config in (FRAGMENTS, dict(FRAGMENTS, BLOCK_M=64), dict(FRAGMENTS, BLOCK_M=256, BLOCK_N=128, num_warps=8)):
        check_split_k_and_pending_sums(fragment_weight(64 if config["num_warps"] == 4 else 128, 640, 64, False), config)


@on_hopper
def test_every_output_is_written_and_unaligned_inputs_are_copied(monkeypatch):
    check_every_output_written_from_unaligned_inputs(fragment_weight(48, 256, 64, True), FRAGMENTS, monkeypatch)


@on_hopper
def test_weights_and_configurations_it_cannot_take_are_refused():
    x = torch.randn(16, 256, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="fragment words"):  # no fragment words
        triton_matmul(x, uniform_weight(32, 256, 4, 64, False), config=FRAGMENTS)
    for config in (dict(FRAGMENTS, num_stages=1), dict(FRAGMENTS, SPLIT_K=0), dict(FRAGMENTS, BLOCK_N=32),
                   dict(FRAGMENTS, num_warps=2), dict(FRAGMENTS, num_warps=8, BLOCK_N=64), dict(FRAGMENTS, BLOCK_M=24)):
        with pytest.raises(ValueError, match="num_stages >= 2, SPLIT_K >= 1"):
            triton_matmul(x, fragment_weight(32, 256, 64, False), config=config)


def test_weights_it_fits_and_the_copy_it_needs():
    weight = uniform_weight(64, 256, 4, 64, False)
    assert w4_fragments.fits(weight, torch.float16)
    assert not w4_fragments.fits(uniform_weight(64, 264, 4, -1, False), torch.float16)  # K not whole blocks of 16
    assert not w4_fragments.fits(uniform_weight(40, 256, 4, 64, False), torch.float16)  # nor N
    assert not w4_fragments.fits(uniform_weight(64, 256, 4, 32, False), torch.float16)  # w4_wgmma's refusals
    made = with_fragments(weight, torch.float16)
    assert (made.fragments is not None) == HOPPER and not w4_fragments.takes(weight, torch.float16)
    words = replace(weight, fragments=w4_fragments.fragment_words(weight.codes()))
    copy = words.copy()
    assert copy.fragments.data_ptr() != words.fragments.data_ptr() and copy.nbytes == weight.nbytes  # read: one layout


def test_its_tiles_are_offered_from_3_tokens_of_fp16(monkeypatch):
    monkeypatch.setattr(gluon_hopper, "runs_on", lambda device: True)  # as on a Hopper GPU
    weight = uniform_weight(64, 256, 4, 64, False)
    assert not any(config.get("FRAGMENTS") for config in candidates(16, weight, torch.float16))  # no copy
    weight = replace(weight, fragments=w4_fragments.fragment_words(weight.codes()))
    for m, block_ms in ((3, {8}), (16, {16}), (40, {64}), (128, {128}), (200, {128, 256}), (1000, {128, 256})):
        offered = [config for config in candidates(m, weight, torch.float16) if config.get("FRAGMENTS")]
        assert {config["BLOCK_M"] for config in offered} == block_ms
        assert all(config["num_warps"] == (8 if config["BLOCK_M"] == 256 else 4) for config in offered)
    assert not any(config.get("FRAGMENTS") for m in (1, 2) for config in candidates(m, weight, torch.float16))
    assert not any(config.get("FRAGMENTS") for config in candidates(40, weight, torch.bfloat16))


def join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gl.join: the two along a new last axis."""
    return torch.stack((a, b), -1)


def kernel_weights(weight) -> torch.Tensor:
    """W [N, K] in fp16 as the kernel makes it, in torch, one output tile of all N and steps of 64
    inputs: each word's 8 values as DEQUANTIZE makes them from the pair of scales and zero points of
    its rows (the checkpoint's row [N] as [N / 2, 2]), joined in the order JOINED, reshaped and
    permuted by FRAGMENT_ORDER into the fragments' rows, those put in the outputs' order by
    OUTPUT_ORDER as the kernel puts its accumulator."""
    words = w4_fragments.fragment_words(weight.codes()).to(torch.int64) & 0xFFFFFFFF
    n, k = weight.out_features, weight.in_features
    group = k if weight.group_size == -1 else weight.group_size
    zeros = torch.full_like(weight.scales, 8, dtype=torch.int64) if weight.zeros is None else weight.zeros.long()
    steps = []
    for start in range(0, k, w4_fragments.STEP):
        g = start // group
        scale, zero = weight.scales[g].reshape(n // 2, 2).float(), zeros[g].reshape(n // 2, 2)
        step = words[:, start // 4: (start + w4_fragments.STEP) // 4]  # [N / 2, 16]
        values = []
        for j in range(8):  # $j: pair p = j // 2 (nibbles p, p + 4), input d = j % 2, row h = p % 2
            pair, d = divmod(j, 2)
            code = (step >> (4 * (pair + 4 * d))) & 15
            values.append(((code - zero[:, pair % 2, None]).float() * scale[:, pair % 2, None]).half())
        v = [values[j] for j in w4_fragments.JOINED]
        joined = join(join(join(v[0], v[1]), join(v[2], v[3])), join(join(v[4], v[5]), join(v[6], v[7])))
        rows = joined.reshape(n // 16, 8, 4, 4, 2, 2, 2).permute(w4_fragments.FRAGMENT_ORDER).reshape(n, 64)
        steps.append(rows.reshape(n // 16, 2, 8, 64).permute(w4_fragments.OUTPUT_ORDER).reshape(n, 64))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("group_size, symmetric", [(64, False), (128, True), (-1, False)])
def test_the_kernel_chain_makes_every_weight_as_the_reference_does(group_size, symmetric):
    """Codes, scales and zero points reach the weight of their own output and input, rounded once."""
    weight = uniform_weight(48, 256, 4, group_size, symmetric)
    assert torch.equal(kernel_weights(weight).cpu(), weight.dequantize().half().cpu())


@pytest.mark.skipif(not gluon_hopper.available(), reason="the kernel is defined where Triton has Gluon")
def test_the_kernel_is_written_with_the_chain_tested_here():
    source = inspect.getsource(w4_fragments._fragments_kernel.fn) + inspect.getsource(w4_fragments._fragments_step.fn)
    joined = "gl.join(gl.join(gl.join(w[{}], w[{}]), gl.join(w[{}], w[{}])),".format(*w4_fragments.JOINED[:4])
    assert joined in source and "gl.join(gl.join(w[{}], w[{}]), gl.join(w[{}], w[{}])))".format(
        *w4_fragments.JOINED[4:]) in source
    assert f"v.permute({w4_fragments.FRAGMENT_ORDER})" in source
    assert f".permute({w4_fragments.OUTPUT_ORDER}).reshape([BLOCK_N, BLOCK_M])" in source


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

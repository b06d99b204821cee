"""w4_wgmma's Gluon kernel (Hopper only) against quant_matmul's reference; its PTX on the CPU model;
where it may be offered."""

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from qtool.kernels import gluon_hopper, quant_matmul, w4_wgmma
from qtool.kernels.quant_matmul import _WORKSPACES, candidates, code_slots, reference, triton_matmul, with_fragments

from ptx_model import _bits16, run  # beside this file (pytest puts its folder on the path)
from test_quant_matmul import DEVICE, check, lut_weight, relative_error, uniform_weight

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9 and gluon_hopper.available()
on_hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on compute capability 9.x only")
WGMMA = dict(WGMMA=True, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, num_warps=4, num_stages=3)


@on_hopper
@pytest.mark.parametrize("group_size, k", [(64, 320), (128, 384), (-1, 328)])  # one a row: a partial last step
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m, block_m", [(3, 16), (17, 32), (130, 128)])  # tokens past a tile; three tiles of 128
def test_the_kernel_matches_the_reference(group_size, k, symmetric, m, block_m):
    """Outputs 80 in tiles of 64 (the second masked)."""
    check(uniform_weight(80, k, 4, group_size, symmetric), m, config=dict(WGMMA, BLOCK_M=block_m))


@on_hopper
@pytest.mark.parametrize("stages, warps, block_n", [(2, 4, 64), (4, 4, 128), (3, 8, 128)])
def test_every_ring_and_warp_count_matches_the_reference(stages, warps, block_n):
    check(uniform_weight(256, 640, 4, 64, False), 20, config=dict(WGMMA, BLOCK_N=block_n, num_warps=warps,
                                                                  num_stages=stages))


@on_hopper
def test_split_k_and_pending_sums():
    check_split_k_and_pending_sums(uniform_weight(64, 640, 4, 64, False), WGMMA)


@on_hopper
def test_a_split_of_a_single_step_stores_y(monkeypatch):
    """64 inputs are one step: split 4 ways they are one share, y stored as unsplit (the workspace the
    caller makes is sized by the shares: none, without an earlier product's)."""
    monkeypatch.setattr(quant_matmul, "_WORKSPACES", {})
    for config in (WGMMA, dict(WGMMA, FRAGMENTS=True, BLOCK_M=64)):
        check(with_fragments(uniform_weight(64, 64, 4, 64, False), torch.float16), 5, config=dict(config, SPLIT_K=4))
        torch.cuda.synchronize()


def check_split_k_and_pending_sums(weight, config: dict) -> None:
    """A weight of 640 inputs, 10 steps: split 3 ways, shares of 4, 4 and 2; 4 ways, 3, 3, 3 and 1; 6
    ways, 5 shares of 2; 16 ways, 10 of 1 (no share empty: `w4_wgmma.grid`)."""
    for split in (3, 3, 3, 4, 6, 16):  # the last program of each tile resets the workspace for the next launch
        check(weight, 5, config=dict(config, SPLIT_K=split))
    torch.cuda.synchronize()
    for (_, _, use), (sums, counts) in _WORKSPACES.items():
        assert not counts.any() and (use != "sums" or not sums.any())
    x = torch.randn(5, 640, dtype=torch.float16, device=DEVICE)
    sums = torch.zeros(5, weight.out_features, device=DEVICE)
    pending = triton_matmul(x, weight, config=dict(config, SPLIT_K=3), sums=sums)
    assert relative_error(pending.result(), reference(x, weight)) < 2e-3


@on_hopper
def test_every_output_is_written_and_unaligned_inputs_are_copied(monkeypatch):
    check_every_output_written_from_unaligned_inputs(uniform_weight(48, 256, 4, 64, True), WGMMA, monkeypatch)


def check_every_output_written_from_unaligned_inputs(weight, config: dict, monkeypatch) -> None:
    """Outputs poisoned with NaN; x 2 bytes past a 16-byte boundary (copied first: TMA would not read it)."""
    flat = torch.randn(5 * 256 + 1, dtype=torch.float16, device=DEVICE)
    x = flat[1:].view(5, 256)
    expected = reference(x, weight)
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: torch.full(shape, float("nan"), **kw))
    out = triton_matmul(x, weight, config=config)
    assert torch.isfinite(out).all() and relative_error(out, expected) < 2e-3


@on_hopper
def test_weights_the_kernel_cannot_take_are_refused():
    x = torch.randn(16, 256, dtype=torch.float16, device=DEVICE)
    for weight in (uniform_weight(32, 256, 8, 64, False), uniform_weight(32, 256, 4, 32, False),
                   uniform_weight(24, 256, 4, 64, False)):
        with pytest.raises(ValueError, match="W4 wgmma"):
            triton_matmul(x, weight, config=WGMMA)
    for config in (dict(WGMMA, num_stages=1), dict(WGMMA, SPLIT_K=0), dict(WGMMA, BLOCK_N=32),
                   dict(WGMMA, BLOCK_N=64, num_warps=8)):
        with pytest.raises(ValueError, match="num_stages >= 2, SPLIT_K >= 1"):
            triton_matmul(x, uniform_weight(32, 256, 4, 64, False), config=config)


def test_weights_it_fits_and_weights_it_does_not():
    weight = uniform_weight(64, 256, 4, 64, False)
    assert w4_wgmma.fits(weight, torch.float16) and w4_wgmma.fits(uniform_weight(64, 256, 4, -1, True), torch.float16)
    assert not w4_wgmma.fits(weight, torch.bfloat16)
    for other in (uniform_weight(64, 256, 8, 64, False), uniform_weight(64, 256, 4, 32, False),
                  uniform_weight(24, 256, 4, 64, False), uniform_weight(64, 256, 4, 64, False, torch.bfloat16),
                  lut_weight(64, 256, 16, -1), replace(weight, zeros=weight.zeros.int()),
                  replace(weight, scales=weight.scales.t().contiguous().t())):
        assert not w4_wgmma.fits(other, torch.float16)
    assert w4_wgmma.takes(weight, torch.float16) == HOPPER


def test_every_share_of_k_has_a_step():
    """The kernels take a share's first step before their loop: the grid leaves no share empty, and the
    shares as the kernel cuts them (cdiv(steps, shares) each) cover every step."""
    for k in range(8, 64 * 70, 8):
        steps = -(-k // w4_wgmma.STEP)
        for split in range(1, 40):
            tiles_m, tiles_n, shares = w4_wgmma.grid(33, 80, k, dict(BLOCK_N=64, BLOCK_M=16, SPLIT_K=split))
            share = -(-steps // shares)
            assert (tiles_m, tiles_n) == (3, 2) and 1 <= shares <= min(split, steps)
            assert (shares - 1) * share < steps <= shares * share, (k, split)


def test_its_tiles_are_offered_for_3_to_256_tokens_of_fp16(monkeypatch):
    monkeypatch.setattr(w4_wgmma, "takes", w4_wgmma.fits)  # as on a Hopper GPU
    weight = uniform_weight(64, 256, 4, 64, False)
    for m, block_m in ((3, 16), (40, 64), (200, 128)):
        offered = [config for config in candidates(m, weight, torch.float16) if config.get("WGMMA")]
        assert offered and all(config["BLOCK_M"] == block_m for config in offered)
    assert not any(config.get("WGMMA") for m in (1, 2, 257) for config in candidates(m, weight, torch.float16))
    assert not any(config.get("WGMMA") for config in candidates(40, weight, torch.bfloat16))


@pytest.mark.parametrize("blocked", ["triton", "triton.experimental"])
def test_the_package_imports_without_triton_or_its_gluon(tmp_path, blocked):
    """With no Triton, or one without Gluon (as before 3.6), the dispatchers import and serve."""
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{blocked!r}] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    code = ("from qtool.kernels import gluon_hopper, int8_matmul, quant_matmul\nimport qtool.runtime.quant_linear\n"
            "assert not gluon_hopper.available()")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_dequantization_ptx_makes_each_weight_as_the_reference_rounds_it():
    """w4_wgmma.DEQUANTIZE run by the CPU model of PTX: each of a word's 8 weights is (q - z) * s
    rounded once to fp16 (what quant_matmul.reference makes of W), bit for bit."""
    generator = np.random.default_rng(0)
    slots = code_slots(4)
    for _ in range(200):
        word = int(generator.integers(0, 2**32))
        zero = int(generator.integers(0, 16))
        scale = np.float16(generator.uniform(-0.05, 0.05))
        made = run(w4_wgmma.DEQUANTIZE, {8: word, 9: _bits16(np.float16(1024 + zero)), 10: _bits16(scale)})
        for j in range(8):
            code = (word >> (4 * slots[j])) & 15
            expected = np.float16(np.float32(code - zero) * np.float32(scale))
            assert made[j] == _bits16(expected), (word, zero, scale, j)

"""The W8A8 kernels against their torch reference on random inputs of odd shapes: the quantization
kernel bit for bit, the int8 GEMM up to the float epilogue's rounding (its integer sums are exact);
under TRITON_INTERPRET=1 on a machine without a GPU (small shapes), on the GPU where there is one."""

import pytest
import torch

from qtool.kernels import int8_matmul as kernels
from qtool.kernels import int8_wgmma
from qtool.kernels.int8_matmul import (Int8Weight, candidates, gemm, int8_matmul, kernel_fits, quantize_per_token,
                                       reference, triton_matmul, triton_quantize)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1)  # small tiles keep the interpreter quick
SPLIT = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3)  # shares of K added in the int32 workspace
INT_MM = dict(INT_MM=True, BLOCK_M=16, BLOCK_N=16)  # torch._int_mm, then the epilogue kernel
# the Gluon kernel (wgmma kept in flight), on Hopper only; split, its shares' sums stored apart
HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9 and int8_wgmma.available()
on_hopper = pytest.mark.skipif(not HOPPER, reason="the wgmma kernel needs a Hopper GPU and a Triton with Gluon")
WGMMA = dict(WGMMA=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=3)
WGMMA_SPLIT = dict(WGMMA, SPLIT_K=3)


def random_weight(n: int, k: int) -> Int8Weight:
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    return Int8Weight(codes, torch.rand(n, device=DEVICE) * 0.01 + 0.001)


def activations(m: int, k: int, dtype) -> torch.Tensor:
    """Rows of different ranges, a few channels far out, as real activations have."""
    x = torch.randn(m, k, device=DEVICE) * (torch.rand(m, 1, device=DEVICE) * 8 + 0.1)
    x[:, torch.randint(0, k, (2,))] *= 20
    return x.to(dtype)


def check(m: int, n: int, k: int, dtype, config: dict, with_bias: bool = True):
    weight = random_weight(n, k)
    x = activations(m, k, dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    out = triton_matmul(x, weight, bias, config=config)
    expected = reference(x, weight.codes, weight.scales, bias)
    assert out.dtype == dtype and out.shape == (m, n) and not out.isnan().any()
    # the sums are exact; the epilogue may round once more or less (an FMA for the bias on a GPU):
    # an fp32 ulp of the largest product, then one rounding to the output dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=torch.finfo(dtype).eps,
                               atol=torch.finfo(torch.float32).eps * expected.float().abs().max().item(),
                               msg=lambda message: f"{config}, {dtype}, M={m}: {message}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [48, 200, 1000])  # any length: the row is masked to a power of two
def test_the_quantization_kernel_is_quantize_per_token_bit_for_bit(dtype, m, k):
    x = activations(m, k, dtype)
    x[0] = 0  # a zero row: the scale's floor
    codes, scales = triton_quantize(x)
    expected_codes, expected_scales = quantize_per_token(x)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)


def test_ties_round_half_to_even_like_torch_round():
    row = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -125.5, 3.0, 0.0, 64.5, 7.49, -7.51, 1.0, 2.0]],
                       device=DEVICE)  # max 127: the scale is exactly 1, so x / scale keeps every tie
    codes, scales = triton_quantize(row)
    assert scales.item() == 1.0
    assert codes.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 3, 0, 64, 7, -8, 1, 2]]
    assert torch.equal(codes, quantize_per_token(row)[0])


@pytest.mark.parametrize("config", [SMALL, SPLIT], ids=["tiles", "split-k"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_gemm_matches_the_reference(config, dtype, m, with_bias):
    check(m, 40, 208, dtype, config, with_bias)  # N, K not powers of two; K not a multiple of BLOCK_K


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_int_mm_and_the_epilogue_kernel_match_the_reference(dtype, with_bias):
    check(17, 40, 208, dtype, INT_MM, with_bias)


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("config", [WGMMA, WGMMA_SPLIT], ids=["tiles", "split-k"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 17, 130])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_gluon_wgmma_gemm_matches_the_reference(config, dtype, m, with_bias):
    # K of 4 blocks, the last one partial (TMA fills past the edge with zeros); split 3 ways, the
    # third share has no block; launched twice, the second finding the arrival counts set back
    for _ in range(2):
        check(m, 40, 208, dtype, config, with_bias)


@pytest.mark.gpu
@on_hopper
def test_the_gluon_wgmma_gemm_refuses_codes_tma_cannot_read():
    weight = random_weight(40, 208)
    codes, scales = triton_quantize(activations(17, 224, torch.float16))
    assert kernels.wgmma_runs(codes[:, 16:], weight)  # rows starting 16 bytes in: still aligned
    shifted = torch.empty(17 * 208 + 1, dtype=torch.int8, device=DEVICE)[1:].view(17, 208)
    assert not kernels.wgmma_runs(shifted, weight)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemm(shifted, scales, weight, None, torch.float16, WGMMA)


@pytest.mark.skipif(not int8_wgmma.available(), reason="no Gluon in this Triton")
def test_the_gluon_wgmma_gemm_refuses_a_ring_of_one_buffer():
    codes, scales = quantize_per_token(activations(3, 64, torch.float32))
    weight = random_weight(16, 64)
    with pytest.raises(ValueError, match="at least 2 buffers"):
        int8_wgmma.launch(codes, scales, weight.codes, weight.scales, None, torch.empty(3, 16), dict(WGMMA, num_stages=1))


def test_split_k_adds_every_share_once_and_leaves_the_workspace_zero():
    for _ in range(3):  # the last program of each tile resets its part of the workspace for the next launch
        check(5, 24, 320, torch.float16, SPLIT)
    workspace, arrivals = kernels._workspace(torch.device(DEVICE), 1, 1)
    assert not workspace.any() and not arrivals.any()


@pytest.mark.parametrize("config, n", [(SMALL, 33), (SPLIT, 33), (INT_MM, 40),
                                       pytest.param(WGMMA, 33, marks=on_hopper), pytest.param(WGMMA_SPLIT, 33, marks=on_hopper)],
                         ids=["tiles", "split-k", "int_mm", "wgmma", "wgmma split-k"])
def test_every_output_is_written(monkeypatch, config, n):
    """Every buffer is poisoned first (NaN, or the code -128 that quantization never writes); a
    tile or row the kernels skipped would show."""
    def poisoned(*shape, dtype, **kw):
        size = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return torch.full(size, float("nan") if dtype.is_floating_point else -128, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "empty", poisoned)
    check(17, n, 96, torch.float16, config)  # _int_mm needs N a multiple of 8


def test_shapes_the_kernels_cannot_take_are_refused_or_fall_back():
    weight = random_weight(24, 100)  # K not a multiple of 16
    x = activations(3, 100, torch.float16)
    assert not kernel_fits(x, weight.codes)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_matmul(x, weight, config=SMALL)
    assert torch.equal(int8_matmul(x, weight.codes, weight.scales), reference(x, weight.codes, weight.scales))
    codes, scales = triton_quantize(activations(3, 96, torch.float16))
    with pytest.raises(ValueError, match="M > 16"):  # torch._int_mm's bounds
        gemm(codes, scales, random_weight(24, 96), None, torch.float16, INT_MM)
    assert not any(config.get("INT_MM") for config in candidates(16, 24, 96))
    assert any(config.get("INT_MM") for config in candidates(17, 24, 96))
    assert not any(config.get("INT_MM") for config in candidates(17, 20, 96))  # N not a multiple of 8
    assert not any(config.get("WGMMA") for m in (17, 300, 5000) for config in candidates(m, 24, 96))
    assert all(any(config.get("WGMMA") for config in candidates(m, 24, 96, wgmma=True)) for m in (17, 300, 5000))
    assert not any(config.get("WGMMA") for config in candidates(16, 24, 96, wgmma=True))  # 16 rows: wgmma wastes 48
    if DEVICE == "cpu":
        assert not kernels.wgmma_runs(codes, random_weight(24, 96))


def test_the_dispatcher_keeps_leading_dimensions_and_runs_the_reference_where_asked(monkeypatch):
    weight = random_weight(24, 64)
    x = activations(6, 64, torch.float16).reshape(2, 3, 64)
    bias = torch.randn(24, device=DEVICE).half()
    expected = reference(x, weight.codes, weight.scales, bias)
    assert expected.shape == (2, 3, 24)
    if DEVICE == "cpu":
        assert torch.equal(int8_matmul(x, weight.codes, weight.scales, bias), expected)
    else:
        torch.testing.assert_close(int8_matmul(x, weight.codes, weight.scales, bias), expected, rtol=1e-3, atol=1e-3)
    monkeypatch.setenv("QTOOL_KERNELS", "reference")
    assert not kernel_fits(x, weight.codes)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="compiles every tuned configuration: needs a CUDA device")
@pytest.mark.parametrize("m, k", [(1, 1024), (48, 1024), (208, 1024), (320, 1024), (1100, 1024),  # each bucket's
                                  (17, 1040), (300, 1040)])  # candidates; K with a masked tail
def test_every_candidate_configuration_on_the_gpu(m, k):
    for config in candidates(m, 320, k, wgmma=HOPPER):
        check(m, 320, k, torch.float16, config)
    for dtype in (torch.bfloat16, torch.float32):  # the epilogue's other casts, on the first candidate
        check(m, 320, k, dtype, candidates(m, 320, k)[0])

"""GPTQ on a CUDA device: the graph-replayed column sweep computes what the eager one computes,
and what the CPU computes (up to float rounding in the matrix products)."""

import os

import pytest
import torch

from qtool.quantize.gptq import gptq
from qtool.quantize.scheme import Scheme

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CASES = [(Scheme(4, 64, False), "none"), (Scheme(4, 128, True), "group"), (Scheme(3, 32, False), "static"),
         (Scheme(8, -1, True), "none"), (Scheme(4, 256, False), "none")]


def problem(out_features=96, in_features=512):
    mixing = torch.randn(in_features, in_features) * 0.1 + torch.eye(in_features)
    inputs = torch.randn(4096, in_features) @ mixing
    return torch.randn(out_features, in_features, dtype=torch.float16), 2 * inputs.T @ inputs / inputs.shape[0]


@pytest.mark.parametrize("mse", [False, True])
@pytest.mark.parametrize("scheme, act_order", CASES, ids=lambda c: str(c))
def test_graph_replay_matches_the_eager_sweep(monkeypatch, scheme, act_order, mse):
    weight, hessian = problem()
    weight, hessian = weight.cuda(), hessian.cuda()
    graphed = gptq(weight, hessian, scheme, act_order=act_order, mse=mse)
    monkeypatch.setenv("QTOOL_CUDA_GRAPHS", "0")
    eager = gptq(weight, hessian, scheme, act_order=act_order, mse=mse)
    assert torch.equal(graphed.weight.packed, eager.weight.packed)
    assert torch.equal(graphed.weight.scales, eager.weight.scales)


@pytest.mark.parametrize("scheme, act_order", CASES, ids=lambda c: str(c))
def test_gpu_codes_agree_with_the_cpu(scheme, act_order):
    weight, hessian = problem()
    cpu = gptq(weight, hessian, scheme, act_order=act_order)
    gpu = gptq(weight.cuda(), hessian.cuda(), scheme, act_order=act_order)
    agree = (cpu.weight.codes() == gpu.weight.codes().cpu()).float().mean().item()
    assert agree > 0.99
    assert gpu.error == pytest.approx(cpu.error, rel=0.02)

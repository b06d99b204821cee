"""y = x @ W^T for W8A8: int8 weights with a scale per output channel, and activations quantized
to int8 per token on the fly (scale max|x| / 127 per row, as SmoothQuant and vLLM's dynamic
per-token scheme do).

- `quantize_per_token`: the activations' int8 codes and float32 scales.
- `reference`: the integer products summed exactly (float64 holds sums of int8 products exactly
  for any K below 2^39), then the epilogue: times the token's and the channel's scale, in float32, cast
  to the activations' dtype. It runs anywhere and defines the result.

An integer GEMM with the epilogue fused (Triton, or `torch._int_mm` plus a fused epilogue) is
the next step; until then CUDA runs the reference too.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [rows, K] and float32 scales [rows, 1] of `x` viewed as rows of its last dimension."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scales = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return torch.round(rows / scales).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def reference(x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] times int8 `weight` [N, K] with float `weight_scales` [N]."""
    codes, scales = quantize_per_token(x)
    sums = codes.double() @ weight.double().t()
    out = (sums.float() * scales) * weight_scales.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

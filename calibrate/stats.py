"""Statistics of a linear layer's inputs, accumulated batch by batch in float32."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def gram(rows: torch.Tensor) -> torch.Tensor:
    """rows^T rows in float32. Half-precision rows on a GPU multiply on the tensor cores with a
    float32 result: products of half values are exact in float32 and the sums accumulate in
    float32, so this equals the float32 product up to summation order, at tensor-core speed."""
    if rows.is_cuda and rows.dtype in HALF_DTYPES:
        try:
            return torch.mm(rows.T, rows, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=): the float32 product below
            pass
    rows = rows.float()
    return rows.T @ rows


class HessianStat:
    """H = 2/n * sum over the n input rows x of x^T x, kept exact as batches arrive (running mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1])
        total = self.count + rows.shape[0]
        self.hessian.mul_(self.count / total).add_(gram(rows), alpha=2.0 / total)
        self.count = total

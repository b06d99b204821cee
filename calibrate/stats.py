"""Statistics of a linear layer's inputs, accumulated batch by batch in float32."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
SPLIT_FROM = 256  # columns per half from which the quadrant split beats one product


def accumulate_gram(target: torch.Tensor, rows: torch.Tensor, beta: float, alpha: float) -> None:
    """target <- beta * target + alpha * rows^T rows, in float32.

    Half-precision rows on a GPU multiply on the tensor cores with a float32 result: products of
    half values are exact in float32 and the sums accumulate in float32, so this equals the
    float32 product up to summation order, at tensor-core speed. Elsewhere the rows are widened
    to float32 and, the product being symmetric, only three of its four quadrants are computed."""
    if rows.is_cuda and rows.dtype in HALF_DTYPES:
        try:
            target.mul_(beta).add_(torch.mm(rows.T, rows, out_dtype=torch.float32), alpha=alpha)
            return
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=): the float32 product below
            pass
    rows = rows.float()
    half = rows.shape[1] // 2
    if half < SPLIT_FROM:
        target.addmm_(rows.T, rows, beta=beta, alpha=alpha)
        return
    left, right = rows[:, :half].contiguous(), rows[:, half:].contiguous()
    target[:half, :half].addmm_(left.T, left, beta=beta, alpha=alpha)
    target[half:, half:].addmm_(right.T, right, beta=beta, alpha=alpha)
    target[:half, half:].addmm_(left.T, right, beta=beta, alpha=alpha)
    target[half:, :half] = target[:half, half:].T


class HessianStat:
    """H = 2/n * sum over the n input rows x of x^T x, kept exact as batches arrive (running mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1])
        total = self.count + rows.shape[0]
        accumulate_gram(self.hessian, rows, beta=self.count / total, alpha=2.0 / total)
        self.count = total

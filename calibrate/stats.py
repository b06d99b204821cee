"""Statistics of a linear layer's inputs, accumulated batch by batch in float32."""

from __future__ import annotations

import torch


class HessianStat:
    """H = 2/n * sum over the n input rows x of x^T x, kept exact as batches arrive (running mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        total = self.count + rows.shape[0]
        self.hessian.mul_(self.count / total)
        rows = rows * (2.0 / total) ** 0.5
        self.hessian.addmm_(rows.T, rows)
        self.count = total

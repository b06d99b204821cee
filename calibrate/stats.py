"""Statistics of a linear layer's inputs, accumulated batch by batch in float32 (float64 for a
layer computing in float64)."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
SPLIT_FROM = 256  # columns per half from which the quadrant split beats one product
CHUNK_BYTES = 64 << 20  # float32 rows widened at a time


def statistic_dtype(linear: torch.nn.Linear) -> torch.dtype:
    """float32, or float64 for a layer that computes in float64 (reference calibration)."""
    return torch.float64 if linear.weight.dtype == torch.float64 else torch.float32


def accumulate_gram(target: torch.Tensor, rows: torch.Tensor, beta: float, alpha: float) -> None:
    """target <- beta * target + alpha * rows^T rows, in the target's dtype (float32 or float64).

    Half-precision rows on a GPU multiply on the tensor cores with a float32 result: products of
    half values are exact in float32 and the sums accumulate in float32, so this equals the
    float32 product up to summation order, at tensor-core speed. Elsewhere the rows are widened
    to the target's dtype (a slab of rows at a time) and, the product being symmetric, only three of its four
    quadrants are computed."""
    if rows.is_cuda and rows.dtype in HALF_DTYPES:
        try:
            target.mul_(beta).add_(torch.mm(rows.T, rows, out_dtype=torch.float32), alpha=alpha)
            return
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=): the float32 product below
            pass
    chunk = max(1, CHUNK_BYTES // (target.element_size() * rows.shape[1]))
    half = rows.shape[1] // 2
    for start in range(0, rows.shape[0], chunk):  # wide inputs widen to float32 a slab at a time
        part = rows[start : start + chunk].to(target.dtype)
        if half < SPLIT_FROM:
            target.addmm_(part.T, part, beta=beta, alpha=alpha)
        else:
            left, right = part[:, :half].contiguous(), part[:, half:].contiguous()
            target[:half, :half].addmm_(left.T, left, beta=beta, alpha=alpha)
            target[half:, half:].addmm_(right.T, right, beta=beta, alpha=alpha)
            target[:half, half:].addmm_(left.T, right, beta=beta, alpha=alpha)
        beta = 1.0
    if half >= SPLIT_FROM:
        target[half:, :half] = target[:half, half:].T


class HessianStat:
    """H = 2/n * sum over the n input rows x of x^T x, kept exact as batches arrive (running mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.hessian: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    def update(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1])
        total = self.count + rows.shape[0]
        accumulate_gram(self.hessian, rows, beta=self.count / total, alpha=2.0 / total)
        self.count = total

    def take(self) -> torch.Tensor:
        """The Hessian, handed over to be overwritten; the statistic is empty after."""
        if self.hessian is None:
            raise RuntimeError("this Hessian statistic was already used up")
        hessian, self.hessian = self.hessian, None
        return hessian


class ActivationStat(HessianStat):
    """The Hessian of a linear layer's inputs and the mean magnitude of each input channel (AWQ's
    activation statistic)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(in_features, device, dtype)
        self.mean_abs = torch.zeros(in_features, dtype=dtype, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1])
        total = self.count + rows.shape[0]
        self.mean_abs.mul_(self.count / total).add_(rows.abs().sum(dim=0, dtype=self.mean_abs.dtype), alpha=1.0 / total)
        super().update(inputs)


class ChannelMaxStat:
    """The largest magnitude each input channel of a linear layer takes (SmoothQuant's statistic)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_abs = torch.zeros(in_features, dtype=dtype, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        torch.maximum(self.max_abs, inputs.reshape(-1, inputs.shape[-1]).abs().amax(dim=0).to(self.max_abs.dtype),
                      out=self.max_abs)


class ChannelSampleStat(ChannelMaxStat):
    """Channel maxima, and every `stride`-th input row kept as it is (a sample of the tokens to
    measure a per-token quantization's error on: SmoothQuant's alpha search)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 stride: int = 64):
        super().__init__(in_features, device, dtype)
        self.stride = stride
        self.rows: list[torch.Tensor] = []

    def update(self, inputs: torch.Tensor) -> None:
        super().update(inputs)
        self.rows.append(inputs.reshape(-1, inputs.shape[-1])[:: self.stride].to(self.max_abs.dtype))

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)

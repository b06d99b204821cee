"""Products left for the next kernel to finish.

A product of a few tokens is split along K, so that every multiprocessor streams its share of the
weight; the shares are float32 sums that someone must add and round to the activations' dtype.
The product can do it itself (the last program of a tile to arrive, counted by an atomic), but on
an H200 that costs 1.1-3.6 us of a 6-25 us one-token product, about 7 us a layer
(benchmarks/results/kernels_h200_split_tail_diagnostic.json). Instead the programs add their
shares into a float32 accumulator that the caller keeps zeroed (`PendingSum`), and the kernel that
reads the product next (RMSNorm, the rotary embedding, SiLU-and-multiply) reads the sums, rounds
them as the product would have (`load_finished`) and sets them back to zero for the product's
next call. An element is read by one program of its reader only, so the zeroing needs no
ordering. The float32 additions arrive in any order, as those of the product's own split do.

A `PendingSum` exists only on CUDA and only where the runtime's model asks for one; anything else
that gets one calls `finished`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.kernels.dispatch import triton_runs

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass(frozen=True)
class PendingSum:
    """The float32 sums of a product (a view into its caller's zeroed accumulator) and the dtype
    its result takes; views and column slices of it share the sums."""

    sums: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.sums.shape

    @property
    def device(self) -> torch.device:
        return self.sums.device

    def view(self, *shape) -> "PendingSum":
        return PendingSum(self.sums.view(*shape), self.dtype)

    def split(self, sizes: list[int], dim: int = -1) -> list["PendingSum"]:
        return [PendingSum(part, self.dtype) for part in self.sums.split(sizes, dim=dim)]

    def result(self) -> torch.Tensor:
        """The product in its dtype, its sums set back to zero (any view)."""
        out = self.sums.to(self.dtype)
        self.sums.zero_()
        return out


def finished(x: torch.Tensor | PendingSum) -> torch.Tensor:
    """x itself, or a pending product's result."""
    return x.result() if isinstance(x, PendingSum) else x


def alike(*values: torch.Tensor | PendingSum, fits=lambda sums: True) -> tuple[bool, list[torch.Tensor]]:
    """(whether a reading kernel takes the values pending, what it reads: their sums, or tensors).
    Pending only when all are and each one's sums `fits` the kernel's addressing; otherwise the
    pending ones are finished (one linear of a pair dense, a view the kernel cannot address), so
    that one kernel reads them all the same way and no sums are left unzeroed."""
    if all(isinstance(value, PendingSum) and fits(value.sums) for value in values):
        return True, [value.sums for value in values]
    return False, [finished(value) for value in values]


def in_triton(x: torch.Tensor | PendingSum) -> bool:
    """Whether a dispatcher hands x to its Triton kernel: a pending product always (it exists only
    where the kernels run)."""
    return isinstance(x, PendingSum) or triton_runs(x)


if triton is not None:
    TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                 torch.float64: tl.float64}

    @triton.jit
    def load_finished(ptr, mask, PENDING: tl.constexpr, DTYPE: tl.constexpr):
        """The values at `ptr` as the finished product holds them, in DTYPE: PENDING, float32 sums,
        rounded, and set back to zero behind the read."""
        if PENDING:
            sums = tl.load(ptr, mask=mask, other=0.0)
            tl.store(ptr, tl.zeros_like(sums), mask=mask)
            values = sums.to(DTYPE)
        else:
            values = tl.load(ptr, mask=mask, other=0.0).to(DTYPE)
        return values


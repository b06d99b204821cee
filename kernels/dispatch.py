"""Where qtool's Triton kernels run: on CUDA tensors when Triton is installed, unless
QTOOL_KERNELS=reference asks for the plain-torch references (to compare, or to rule a kernel out)."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except ImportError:  # no Triton (macOS, or a stripped install): the references serve
    triton = None


def triton_runs(x: torch.Tensor) -> bool:
    """Whether the dispatchers may hand `x` to a Triton kernel (each then checks what its kernel takes)."""
    return triton is not None and x.is_cuda and os.environ.get("QTOOL_KERNELS") != "reference"


def compute_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (asked once per device)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)

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


def indexed(device: torch.device) -> torch.device:
    """"cuda" as "cuda:N" (the current device): the device tensors report, the key per-device state
    is kept under (state made for "cuda" would be made again for "cuda:0")."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def compute_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (asked once per device)."""
    return _capability(indexed(device).index)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)

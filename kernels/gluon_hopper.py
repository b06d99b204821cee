"""Gluon's Hopper module, as qtool's Gluon kernels take it (int8_wgmma, w4_wgmma, w4_fragments): imported once,
from the Triton versions the kernels were compiled with, under the names of Triton 3.6 and 3.7+."""

from __future__ import annotations

import functools

from qtool.kernels.dispatch import compute_capability

TESTED_FROM = (3, 6)  # Gluon is experimental and its API moves: versions before this one were never tried

triton = None
try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < TESTED_FROM:
        raise ImportError(f"Gluon of Triton {triton.__version__}: never tried")
except ImportError:  # no Triton, one without Gluon, or an older one: the Triton kernels serve
    gluon = gl = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = fence_async_shared = TensorDescriptor = None

if gluon is not None:
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed in Triton 3.7
    cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed in Triton 3.7
else:
    tma_load = cta_barrier = wait_for_previous = None


def available() -> bool:
    """Whether this Triton has Gluon's Hopper module, in a version the kernels were compiled with."""
    return gluon is not None


def runs_on(device) -> bool:
    """Whether the Gluon kernels run on `device`: a CUDA device of compute capability 9.x (Hopper, what
    they are written for), with this Triton's Gluon."""
    return available() and device.type == "cuda" and compute_capability(device)[0] == 9


def descriptor(tensor, block: list[int], layout=None) -> "TensorDescriptor":
    """A TMA descriptor of a 2-D tensor (its rows contiguous) in blocks of `block`, into shared memory
    laid out as wgmma reads it (the default for the block) unless `layout` says otherwise."""
    layout = layout or _default_layout(tuple(block), tensor.dtype)
    rows, columns = tensor.shape
    # a tensor of one row may report any stride for it (a transposed column does); TMA checks it
    row_stride = columns if rows == 1 else tensor.stride(0)
    return TensorDescriptor(tensor, [rows, columns], [row_stride, tensor.stride(1)], block, layout)


@functools.cache
def _default_layout(block: tuple, dtype) -> "gl.NVMMASharedLayout":
    """wgmma's shared-memory layout for blocks of `dtype` (made once: a launch makes one for x)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


if gluon is not None:
    import torch

    _GL_DTYPES = {torch.int8: gl.int8, torch.uint8: gl.uint8, torch.int32: gl.int32, torch.float16: gl.float16,
                  torch.bfloat16: gl.bfloat16}

    @gluon.jit
    def wait_for_previous(PDL: gl.constexpr):
        """`dependent_launch.wait_for_previous` in Gluon: until the kernel before has finished and its
        writes are visible (PDL)."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

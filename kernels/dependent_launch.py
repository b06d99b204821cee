"""Kernels launched as programmatic dependents of the kernel before them (PDL; Hopper and later).

A decode step of one token is some three hundred kernels in a CUDA graph, most of them a few
microseconds long; each is launched only once the one before it has ended. Launched as a
programmatic dependent, a kernel's programs are placed on the multiprocessors as the kernel before
it winds down, and wait there (`griddepcontrol.wait`) until that kernel has finished and its writes
are visible: the launch and whatever a program reads of its own constants overlap the previous
kernel's tail.

The rule that keeps this correct: a kernel launched so waits, in every program, before it reads or
writes anything another kernel touches. (One that ended before its predecessor would let the
kernel after it overtake that predecessor.) Quantized weights are the one exception taken: no
kernel writes them after the model is loaded, so the W4 Gluon kernels load their first steps' before
the wait (`w4_wgmma.start_ring`). Its own dependent is launched as its programs end, not
earlier: on an H200 (benchmarks/results/runtime_h200.md, "Kernels launched as programmatic
dependents") kernels that let the next one launch right after their wait made a decode step of
eight sequences slower than plain launches (4.03 against 3.83 ms), where waiting alone made it
faster (3.65-3.68 against 3.74-3.82 ms): the next kernel's programs, placed early, took the
multiprocessors' places from this one's.
"""

from __future__ import annotations

import os

import torch

from qtool.kernels.dispatch import compute_capability

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
try:
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # no Triton, or one older than grid dependency control (3.4): kernels launch plainly
    gdc_wait = None


def dependent_launch(device: torch.device) -> dict:
    """The options of a kernel launch on `device`: `PDL` for the kernel (whether to wait, see
    `wait_for_previous`) and, where it applies, Triton's `launch_pdl`."""
    if not overlaps(device):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


def overlaps(device: torch.device) -> bool:
    """Whether kernels on `device` launch as programmatic dependents: a CUDA device of compute
    capability 9 or more, a Triton with grid dependency control, not the interpreter."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return compute_capability(device) >= (9, 0)


if gdc_wait is not None:

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):
        """Until the previous kernel has finished and its writes are visible (PDL)."""
        if PDL:
            gdc_wait()

elif triton is not None:

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):  # PDL is never set without grid dependency control
        pass

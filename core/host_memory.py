"""Handing freed host memory back to the system between the phases of a calibration."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _trim_function():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _trim_function()


def release_freed_memory() -> None:
    """Return the free pages of the C heap to the system.

    glibc serves blocks below a threshold that grows to 32 MiB from its heap, and freed ones stay
    resident; calibrating a large model frees many tensors of that size, which would otherwise
    add up between phases (0.4 GB around an 8B model's down projection). Costs about a
    millisecond; does nothing where the C library is not glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

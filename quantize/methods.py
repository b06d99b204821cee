"""The registry of quantization methods, and the result type they share.

A method is a pure function from (weight, scheme, statistics) to a `MethodResult`: no module
walking, hooks or I/O. The driver (`qtool.quantize.apply`) decides which layers get which scheme
and what statistics each method is handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from qtool.quantize.grid import dequantize_codes, fit_minmax, quantize_to_codes
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme
from qtool.registry import Registry


@dataclass
class MethodResult:
    """The quantized weight and its relative error: ||W - Q||^2 / ||W||^2 on the weights for
    data-free methods, on the layer outputs for calibrated ones (`error_kind` says which)."""

    weight: QuantizedWeight
    error: float
    error_kind: str


@dataclass(frozen=True)
class Method:
    """A registered method: its function, and whether it needs calibration statistics."""

    name: str
    run: Callable[[torch.Tensor, Scheme, Any], MethodResult]
    needs_calibration: bool


METHODS: Registry[Method] = Registry("method")


def method(name: str, needs_calibration: bool):
    def add(run):
        METHODS.register(name)(Method(name, run, needs_calibration))
        return run

    return add


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    reference = reference.float()
    denominator = reference.pow(2).sum().item()
    return (reference - approximation.float()).pow(2).sum().item() / max(denominator, 1e-30)


@method("rtn", needs_calibration=False)
def round_to_nearest(weight: torch.Tensor, scheme: Scheme, stats: Any = None) -> MethodResult:
    """Round each weight to the nearest point of its group's min-max grid."""
    grid = fit_minmax(weight, scheme, scale_dtype=weight.dtype)
    codes = quantize_to_codes(weight, grid, scheme)
    dequantized = dequantize_codes(codes, grid.scales, grid.zeros, scheme.group_size)
    return MethodResult(QuantizedWeight.from_codes(codes, grid, scheme), relative_error(weight, dequantized), "weight")

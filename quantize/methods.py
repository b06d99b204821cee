"""The registry of quantization methods, and the result type they share.

A method turns one layer's weight (plus, for calibrated methods, a statistic of its inputs) into a
`MethodResult`: no module walking, hooks or I/O. The driver (`qtool.quantize.apply`) decides which
layers get which scheme and collects the statistics a method names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from qtool.calibrate.stats import ActivationStat, HessianStat, statistic_dtype
from qtool.quantize.awq import prepare_block
from qtool.quantize.gptq import gptq, output_error
from qtool.quantize.grid import dequantize_codes, fit_grid, quantize_to_codes
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Recipe, Scheme
from qtool.quantize.smoothquant import smooth_block
from qtool.quantize.squeezellm import squeeze
from qtool.registry import Registry


@dataclass
class MethodResult:
    """The quantized weight and its relative error: ||W - Q||^2 / ||W||^2 on the weights for
    data-free methods, on the layer outputs (through the input Hessian) for calibrated ones;
    `error_kind` says which. `notes` records numerical fallbacks (raised damping...)."""

    weight: QuantizedWeight
    error: float
    error_kind: str
    notes: dict | None = None


Run = Callable[..., MethodResult]  # run(weight, scheme, *, stats, recipe, scale_dtype)
Statistic = Callable[[nn.Linear, torch.device], Any]
Prepare = Callable[..., dict]  # prepare(run: BlockRun, plan, recipe, scale_dtype) -> statistics by input group
Sensitivity = Callable[[Recipe], bool]  # whether the recipe wants the model's Fisher information


@dataclass(frozen=True)
class Method:
    """A registered method and, for calibrated methods, the statistic of a linear layer's inputs it
    needs (built per input, fed batch by batch through `update`).

    Data-free methods run on one weight: run(weight, scheme, *, stats, recipe, scale_dtype).
    Calibrated methods run on every layer that reads one input, with that input's statistic:
    run(weights, scheme, *, stats, recipe, scale_dtype) -> one result per weight. They may use the
    statistic up (reuse its memory); a caller that needs it twice passes copies.

    `prepare(run, plan, recipe, scale_dtype)`, where given, first transforms each decoder block
    as a whole (AWQ folds its scales) and returns the statistics of its input groups, keyed by
    each group's first linear; a method without a `statistic` of its own is run with those.

    Methods that use the whole model's sensitivity instead (SqueezeLLM) run layer by layer on
    the original weights, like data-free ones, with the layer's diagonal Fisher information as
    `stats` when `sensitivity(recipe)` says the recipe wants it (None otherwise). `lut`: the
    method stores look-up tables, so its schemes say so.
    """

    name: str
    run: Run
    statistic: Statistic | None = None
    prepare: Prepare | None = None
    sensitivity: Sensitivity | None = None
    lut: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)  # recipe settings it takes unless told otherwise

    @property
    def sequential(self) -> bool:
        """Calibrated block by block on the calibration data (GPTQ, AWQ)."""
        return self.statistic is not None or self.prepare is not None

    def needs_calibration(self, recipe: Recipe) -> bool:
        return self.sequential or (self.sensitivity is not None and self.sensitivity(recipe))


METHODS: Registry[Method] = Registry("method")


def method(name: str, statistic: Statistic | None = None, prepare: Prepare | None = None,
           sensitivity: Sensitivity | None = None, lut: bool = False, defaults: Mapping[str, Any] | None = None):
    def add(run: Run) -> Run:
        METHODS.register(name)(Method(name, run, statistic, prepare, sensitivity, lut, defaults or {}))
        return run

    return add


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    reference = reference.float()
    denominator = reference.pow(2).sum().item()
    return (reference - approximation.float()).pow(2).sum().item() / max(denominator, 1e-30)


@method("rtn")
def round_to_nearest(weight: torch.Tensor, scheme: Scheme, *, stats: Any = None, recipe: Recipe | None = None,
                     scale_dtype: torch.dtype | None = None) -> MethodResult:
    """Round each weight to the nearest point of its group's grid (min-max, or searched with mse)."""
    grid = fit_grid(weight, scheme, scale_dtype or weight.dtype, mse=recipe is not None and recipe.mse)
    codes = quantize_to_codes(weight, grid, scheme)
    dequantized = dequantize_codes(codes, grid.scales, grid.zeros, scheme.group_size)
    return MethodResult(QuantizedWeight.from_codes(codes, grid, scheme), relative_error(weight, dequantized), "weight")


def hessian_statistic(linear: nn.Linear, device: torch.device) -> HessianStat:
    return HessianStat(linear.in_features, device, statistic_dtype(linear))


@method("awq", prepare=prepare_block)
def awq_method(weights: list[torch.Tensor], scheme: Scheme, *, stats: ActivationStat, recipe: Recipe,
               scale_dtype: torch.dtype | None = None) -> list[MethodResult]:
    """Round each weight, scaled and clipped by AWQ's `prepare_block`, to its grid; the error is
    measured on the layer outputs through the Hessian of the (scaled) inputs."""
    results = []
    for weight in weights:
        grid = fit_grid(weight, scheme, scale_dtype or weight.dtype, mse=recipe.mse)
        quantized = QuantizedWeight.from_codes(quantize_to_codes(weight, grid, scheme), grid, scheme)
        results.append(MethodResult(quantized, output_error(weight, quantized, stats.hessian), "output"))
    return results


@method("gptq", statistic=hessian_statistic)
def gptq_method(weights: list[torch.Tensor], scheme: Scheme, *, stats: HessianStat, recipe: Recipe,
                scale_dtype: torch.dtype | None = None) -> list[MethodResult]:
    """Layers reading one input share its Hessian, so their rows are solved as one matrix (rows are
    independent in GPTQ): one factorisation and one column sweep instead of one per layer. The
    statistic is used up: its Hessian's memory holds the factorisation."""
    options = recipe.gptq
    result = gptq(weights, stats.take(), scheme, options.block_size, options.damp, options.act_order, scale_dtype,
                  mse=recipe.mse, overwrite_hessian=True)
    notes = {"damp": result.damp} if result.damp != options.damp else None
    sizes = [weight.shape[0] for weight in weights]
    return [
        MethodResult(part, error, "output", notes)
        for part, error in zip(result.weight.split_rows(sizes), result.part_errors(sizes))
    ]


@method("squeezellm", sensitivity=lambda recipe: recipe.squeezellm.fisher, lut=True,
        defaults={"scheme": {"group_size": -1}, "calibration": {"nsamples": 100}, "output": {"format": "qtool"}})
def squeezellm_method(weight: torch.Tensor, scheme: Scheme, *, stats: torch.Tensor | None = None, recipe: Recipe,
                      scale_dtype: torch.dtype | None = None) -> MethodResult:
    """Weighted k-means of each row (or row group) into a look-up table, the weights held out as
    outliers stored sparse; the error is the Fisher-weighted one, relative (plain on the weights
    without Fisher information)."""
    options = recipe.squeezellm
    quantized = squeeze(weight, stats, scheme, options.outliers, options.sensitive_fraction, options.max_iterations)
    delta = (weight.float() - quantized.dequantize(torch.float32)).pow(2)
    sensitivity = torch.ones_like(delta) if stats is None else stats.float()
    error = (sensitivity * delta).sum().item() / max((sensitivity * weight.float().pow(2)).sum().item(), 1e-30)
    return MethodResult(quantized, error, "weight" if stats is None else "fisher-weighted weight")


METHODS.register("awq+gptq")(Method("awq+gptq", gptq_method, hessian_statistic, prepare_block))

W8A8 = {"scheme": {"bits": 8, "group_size": -1, "symmetric": True, "activation_bits": 8}}


@method("smoothquant", prepare=smooth_block, defaults=W8A8)
def smoothquant_method(weights: list[torch.Tensor], scheme: Scheme, *, stats, recipe: Recipe,
                       scale_dtype: torch.dtype | None = None) -> list[MethodResult]:
    """Round each weight, smoothed by SmoothQuant's `smooth_block`, to nearest on its grid."""
    return [round_to_nearest(weight, scheme, recipe=recipe, scale_dtype=scale_dtype) for weight in weights]


METHODS.register("smoothquant+gptq")(Method("smoothquant+gptq", gptq_method, hessian_statistic, smooth_block, defaults=W8A8))

"""Where a per-channel scale can be folded exactly: for each group of linears reading one tensor,
the module before them whose output that tensor scales with (a norm, or a linear such as up_proj
before down_proj), found by trying, not from a table per architecture.

Folding s divides the producer's output channels by s and multiplies the consumers' input columns
by s; the block computes the same function. A candidate producer is accepted only if the block's
output on one sample, in float32 (float64 for a float64 model), stays the same when a random scale is folded into it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from qtool.calibrate.pipeline import BlockRun, call_block, first_sample
from qtool.calibrate.stats import statistic_dtype
from qtool.calibrate.trace import map_tensors

log = logging.getLogger(__name__)
PROBE_TOLERANCE = 1e-4  # relative change of the block output allowed when folding a random scale


NORM_OFFSETS = (0.0, 1.0)  # norms scale by `weight`, or by `1 + weight` (Gemma)


@dataclass(frozen=True)
class ScalingGroup:
    """Linears reading one tensor, and the module whose output channels that tensor follows. A
    norm producer scales its output by `offset + weight`."""

    producer: str
    linears: tuple[str, ...]
    offset: float = 0.0


def fold_scales(block: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by `scales` and multiply the linears' input columns by them."""
    modules = dict(block.named_modules())
    producer = modules[group.producer]
    for name, param in _channel_params(producer):
        shape = (-1,) + (1,) * (param.dim() - 1)
        offset = group.offset if name == "weight" else 0.0
        scaled = (param.data.float() + offset) / scales.view(shape).to(param.device) - offset
        param.data = scaled.to(param.dtype)
    for name in group.linears:
        weight = modules[name].weight
        weight.data = (weight.data.float() * scales.to(weight.device)).to(weight.dtype)


def scaling_groups(run: BlockRun) -> list[ScalingGroup]:
    """The block's input groups that have a producer to fold scales into, in forward order; the
    others are logged and left out."""
    trace = run.trace()
    probe = _Probe(run)
    groups = []
    for linears in trace.groups:
        width = run.linears[linears[0]].in_features
        candidates = [
            name for name, module in run.block.named_modules()
            if name and name not in linears and trace.left.get(name, 1 << 62) < trace.entered[linears[0]]
            and _channel_count(module) == width
        ]
        tries = [ScalingGroup(name, tuple(linears), offset)
                 for name in sorted(candidates, key=trace.left.get, reverse=True)
                 for offset in (NORM_OFFSETS if not isinstance(run.block.get_submodule(name), nn.Linear) else (0.0,))]
        group = next((group for group in tries if probe.folds_exactly(group)), None)
        if group is None:
            log.info("%s.%s: no module before it takes a per-channel scale exactly; not scaled",
                     run.prefix, ", ".join(linears))
            continue
        groups.append(group)
    return groups


def collect_group_stats(run: BlockRun, plan: dict, make_stat) -> tuple[dict, dict]:
    """One pass collecting `make_stat(in_features, device, dtype)` for each input group that has a
    quantized linear: the statistics keyed by each group's first linear, and by every linear."""
    planned = [names for names in run.input_groups() if any(plan.get(run.full_name(n)) for n in names)]
    stats = run.collect([names[0] for names in planned],
                        lambda linear: make_stat(linear.in_features, run.device, statistic_dtype(linear)))
    return stats, {name: stats[names[0]] for names in planned for name in names}


def quantized_scaling_groups(run: BlockRun, plan: dict):
    """Each scaling group of the block with the names of its linears that `plan` quantizes (groups
    with none are left out)."""
    for group in scaling_groups(run):
        quantized = [name for name in group.linears if plan.get(run.full_name(name))]
        if quantized:
            yield group, quantized


def _channel_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that set each output channel of a norm (weight, bias) or linear (rows, bias)."""
    return [(name, param) for name, param in module.named_parameters(recurse=False) if name in ("weight", "bias")]


def _channel_count(module: nn.Module) -> int | None:
    """Output channels a scale could be folded into: a linear's outputs, or a leaf module with a
    one-dimensional weight (a norm); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1 and not list(module.children()):
        return weight.shape[0]
    return None


class _Probe:
    """A float32 (or float64) copy of the block and one calibration sample, to try folds on."""

    def __init__(self, run: BlockRun):
        dtype = torch.float64 if next(run.block.parameters()).dtype == torch.float64 else torch.float32
        self.block = copy.deepcopy(run.block).to(dtype)
        hidden = run.inputs.hidden[0][:1].to(dtype)
        kwargs = map_tensors(first_sample(run.inputs.kwargs[0]),
                             lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor)
        self.call = lambda: call_block(self.block, hidden, kwargs, run.device)
        with torch.no_grad():
            self.update = self.call() - hidden.to(run.device)  # what the block adds to its input
        self.hidden = hidden.to(run.device)
        self.generator = torch.Generator().manual_seed(0)

    def folds_exactly(self, group: ScalingGroup) -> bool:
        modules = dict(self.block.named_modules())
        scales = torch.rand(modules[group.linears[0]].in_features, generator=self.generator) * 1.5 + 0.5
        touched = [param for _, param in _channel_params(modules[group.producer])]
        touched += [modules[name].weight for name in group.linears]
        saved = [param.data.clone() for param in touched]
        with torch.no_grad():
            fold_scales(self.block, group, scales)
            update = self.call() - self.hidden
            for param, value in zip(touched, saved):
                param.data = value
        return bool((update - self.update).norm() <= PROBE_TOLERANCE * self.update.norm())

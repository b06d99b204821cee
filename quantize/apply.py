"""Quantize a model's linear layers according to a recipe.

This module walks the model and hands each weight to the method; the methods themselves
(`qtool.quantize.methods`) never see modules.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from qtool.calibrate.fisher import diagonal_fisher
from qtool.calibrate.pipeline import BlockRun, calibrate_sequentially, decoder_blocks
from qtool.errors import QtoolError
from qtool.host_memory import release_freed_memory
from qtool.quantize.methods import METHODS, MethodResult
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.resume import BlockStore
from qtool.quantize.scheme import Recipe, Scheme
from qtool.runtime.lazy import LazyWeights


@dataclass
class QuantizedModel:
    """What quantizing a model produced: the quantized layers, their errors, the layers left dense.
    With a `BlockStore`, layers of finished blocks are placeholders (meta tensors) that the store reads back."""

    weights: dict[str, QuantizedWeight]
    errors: dict[str, dict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def output_layer_name(model: nn.Module) -> str | None:
    """The name of the output projection (lm_head), which stays dense unless a recipe asks for it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def plan_layers(model: nn.Module, recipe: Recipe) -> dict[str, Scheme | None]:
    """The scheme each linear layer gets (None: stays dense), in module order."""
    head = output_layer_name(model)
    plan = {}
    for name in linear_layers(model):
        if name == head:
            plan[name] = next((o.scheme for o in recipe.overrides if o.matches(name)), None)
        else:
            plan[name] = recipe.scheme_for(name)
    if head is not None and plan.get(head) is not None and _is_tied(model):
        raise QtoolError(
            f"{head} shares its weight with the input embeddings, so it cannot be quantized alone; "
            f"drop the override that matches {head!r}"
        )
    return plan


def _is_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def check_group_sizes(model: nn.Module, plan: dict[str, Scheme | None]) -> None:
    """Refuse, before any work, a group size that does not divide a layer's input features."""
    layers = linear_layers(model)
    bad = {
        name: layers[name].in_features
        for name, scheme in plan.items()
        if scheme is not None and scheme.group_size != -1 and layers[name].in_features % scheme.group_size
    }
    if not bad:
        return
    sizes = sorted(set(bad.values()))
    common = math.gcd(*(layers[name].in_features for name, scheme in plan.items() if scheme is not None))
    valid = [str(d) for d in range(8, common + 1) if common % d == 0] + ["-1"]
    names = ", ".join(list(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise QtoolError(
        f"group size does not divide the input features ({', '.join(map(str, sizes))}) of {names}; "
        f"group sizes that fit every quantized layer: {', '.join(valid)}"
    )


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calibration: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    scale_dtype: torch.dtype | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    batch_size: int = 8,
    offload_activations: bool = False,
    store: BlockStore | None = None,
    matmul_dtype: torch.dtype | None = None,
    weights: LazyWeights | None = None,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
) -> QuantizedModel:
    """Quantize every planned linear layer of `model` with the recipe's method.

    Data-free methods leave the model unchanged. Calibrated methods run block by block over the
    `calibration` token windows [n, seqlen] on `device`, and leave each quantized linear holding
    its dequantized weight, so later blocks are calibrated on what the quantized model computes.
    Scales are stored in `scale_dtype` (default: each weight's dtype). `on_layer(name, done,
    total)` is called before each layer and `on_block(index, count)` before each decoder block,
    for progress displays; `batch_size` windows go through a block at once, and their activations
    wait on the CPU between blocks if `offload_activations`. With a `store`, every finished block
    is saved, and blocks an earlier run finished are restored instead of calibrated. Calibration
    forwards run under autocast to `matmul_dtype` when it is given (weights keep their dtype).
    With lazy `weights`, each layer or block is read from disk when its turn comes, and the
    weights of quantized layers are released once they are quantized. Methods that weigh by
    sensitivity get each layer's diagonal Fisher information from `sensitivity` (name -> tensor,
    e.g. a cache on disk), computed here on the calibration data when not given.
    """
    method = METHODS.get(recipe.method)
    plan = plan_layers(model, recipe)
    if not any(plan.values()):
        raise QtoolError("no layer is left to quantize: every linear layer is skipped by the recipe")
    check_group_sizes(model, plan)
    kind = "look-up tables" if method.lut else "uniform grids"
    if any(scheme.lut != method.lut for scheme in plan.values() if scheme is not None):
        raise QtoolError(f"method {recipe.method} stores {kind}, which the recipe's schemes contradict")
    started = time.perf_counter()
    result = QuantizedModel(weights={}, skipped=[name for name, scheme in plan.items() if scheme is None])
    total = len(plan) - len(result.skipped)

    def record(name: str, outcome: MethodResult) -> None:
        result.weights[name] = outcome.weight.to("cpu")
        result.errors[name] = {"error": outcome.error, "kind": outcome.error_kind, **(outcome.notes or {})}

    def quantize_layer(name: str, layer: nn.Linear, stats=None) -> None:
        if on_layer is not None:
            on_layer(name, len(result.weights), total)
        record(name, method.run(layer.weight.data, plan[name], stats=stats, recipe=recipe, scale_dtype=scale_dtype))

    def quantize_together(names: list[str], layers: list[nn.Linear], stats) -> None:
        """Quantize layers reading one input; each keeps its dequantized weight (made on its device)."""
        if on_layer is not None:
            on_layer(", ".join(names), len(result.weights), total)
        outcomes = method.run([layer.weight.data for layer in layers], plan[names[0]], stats=stats, recipe=recipe,
                              scale_dtype=scale_dtype)
        for name, layer, outcome in zip(names, layers, outcomes):
            record(name, outcome)
            layer.weight.data = outcome.weight.dequantize(layer.weight.dtype)

    if method.needs_calibration(recipe):
        if calibration is None and sensitivity is None:
            raise QtoolError(f"method {recipe.method!r} needs calibration data")
        prefix, _ = decoder_blocks(model)
        outside = [name for name, scheme in plan.items() if scheme and not name.startswith(prefix + ".")]
        if outside:
            raise QtoolError(
                f"{', '.join(outside[:3])} lie outside the decoder blocks, where {recipe.method} cannot "
                f"calibrate; leave them dense with --skip"
            )
    with torch.no_grad():
        if not method.sequential:
            if method.needs_calibration(recipe) and sensitivity is None:
                targets = [name for name, scheme in plan.items() if scheme is not None]
                sensitivity = diagonal_fisher(model, calibration, targets, device, matmul_dtype=matmul_dtype,
                                              weights=weights)
            for name, layer in linear_layers(model).items():
                if plan[name] is not None:
                    if weights is not None:
                        weights.load(layer)
                    quantize_layer(name, layer, None if sensitivity is None else sensitivity[name])
                    if weights is not None:
                        weights.release(layer)
        else:
            handler = _block_handler(method, plan, recipe, quantize_together, scale_dtype)
            if store is not None:
                handler = _resumable(handler, store, result)
            calibrate_sequentially(
                model, calibration, handler, device,
                batch_size=batch_size, offload_activations=offload_activations, on_block=on_block,
                matmul_dtype=matmul_dtype, weights=weights,
                on_block_done=_release_quantized(weights, result) if weights is not None else None,
            )
    result.seconds = time.perf_counter() - started
    return result


def _block_handler(method, plan, recipe: Recipe, quantize_together, scale_dtype):
    """Calibrate one block. A method with `prepare` first transforms the block as a whole. Linears
    reading the same input share one statistic of it and are quantized together (by scheme).
    True-sequential: each such group is calibrated after the groups before it are quantized;
    otherwise all groups are calibrated in one pass. A method without a statistic of its own uses
    the ones `prepare` returns. Quantized linears keep their dequantized weights, so what the block
    computes next sees them."""

    def quantize_group(run: BlockRun, group: list[str], stat) -> None:
        schemes = _by_scheme(group, lambda local: plan[run.full_name(local)])
        for position, same_scheme in enumerate(schemes):  # a method may use its statistic up
            shared = stat if position == len(schemes) - 1 else copy.deepcopy(stat)
            layers = [run.linears[local] for local in same_scheme]
            quantize_together([run.full_name(local) for local in same_scheme], layers, shared)
            del shared
            release_freed_memory()

    def handle(run: BlockRun) -> None:
        prepared = method.prepare(run, plan, recipe, scale_dtype) if method.prepare is not None else {}
        groups = [(full[0], [local for local in full if plan.get(run.full_name(local))]) for full in run.input_groups()]
        groups = [(first, group) for first, group in groups if group]
        if method.statistic is None:
            for first, group in groups:
                quantize_group(run, group, prepared.pop(first))
            return
        del prepared  # the method collects its own statistics below
        stages = [[group] for _, group in groups] if recipe.gptq.true_sequential else [[g for _, g in groups]]
        for stage in stages:
            changed = [local for group in stage for local in group]
            stats = run.collect([group[0] for group in stage], lambda linear: method.statistic(linear, run.device),
                                then_changes=changed)
            for group in stage:
                quantize_group(run, group, stats[group[0]])

    return handle


def _release_quantized(weights: LazyWeights, result: QuantizedModel):
    """After a block: its quantized linears live on in `result`; their dense weights can go."""

    def release(run: BlockRun) -> None:
        for local, linear in run.linears.items():
            if run.full_name(local) in result.weights:
                weights.release(linear)

    return release


def _resumable(handler, store: BlockStore, result: QuantizedModel):
    """`handler` for blocks not finished before; finished ones get their saved weights back, and
    their other parameters as the method left them (AWQ's folded norms). Either way the block's
    quantized layers stay in the store: `result` keeps placeholders (meta tensors)
    that `store.read` turns back into weights when the checkpoint is written."""

    def handle(run: BlockRun) -> None:
        saved = store.load(run.index)
        if saved is None:
            before = set(result.weights)
            handler(run)
            saved = {n: w for n, w in result.weights.items() if n not in before}
            dense = {run.full_name(name): param for name, param in run.block.named_parameters()
                     if run.full_name(name).removesuffix(".weight") not in saved}
            store.save(run.index, saved, result.errors, dense)
        else:
            for name, weight in saved.items():
                layer = run.linears[name.removeprefix(run.prefix + ".")]
                layer.weight.data = weight.to(layer.weight.device).dequantize(layer.weight.dtype)
            for name, value in store.dense(run.index).items():
                param = run.block.get_parameter(name.removeprefix(run.prefix + "."))
                param.data = value.to(param.device, param.dtype)
        for name, weight in saved.items():
            result.weights[name] = weight.to("meta")
            result.errors[name] = store.errors[name]

    return handle


def _by_scheme(names: list[str], scheme_of) -> list[list[str]]:
    groups: dict[Scheme, list[str]] = {}
    for name in names:
        groups.setdefault(scheme_of(name), []).append(name)
    return list(groups.values())

"""GPTQ's checkpoint layout (AutoGPTQ / GPTQModel, `checkpoint_format` gptq, also read as gptq_v2).

Per quantized linear `NAME` (out x in, b bits in {2, 3, 4, 8}, G groups):

    NAME.qweight  int32 [in*b/32, out]   codes packed along the input dimension: column o is the
                                         little-endian bit stream of its codes (code i at stream
                                         bits [b*i, b*(i+1)), as `qtool.quantize.packing` draws
                                         it), so for 3 bits a code may straddle two words
    NAME.qzeros   int32 [G, out*b/32]    zero points minus one (v1; v2 stores them as they are),
                                         packed the same way along the output dimension
    NAME.scales   float16 [G, out]
    NAME.g_idx    int32 [in]             the group of each input column (i // group_size unless
                                         act-order moved them)

Dequantization: w[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o], with z the stored value
plus one in v1. G = 1 for one group per output channel (`group_size` -1). Symmetric grids store
the zero point 2^(b-1) all the same. `quantization_config` holds quant_method gptq, bits,
group_size, desc_act, sym and checkpoint_format; layers whose scheme differs from those get a
GPTQModel `dynamic` entry ("+:regex": {bits, group_size, sym, desc_act}), and linears left dense
a skip ("-:regex": {}). Regexes are matched from the start of the layer name (re.match); qtool's
also match the name vLLM gives the fused layer they belong to (qkv_proj, gate_up_proj).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.quantize import packing
from qtool.quantize.format.checkpoint import dense_tensors, model_config
from qtool.quantize.format.layout import (
    activations_misfit, float16_misfit, fused_name, nonuniform_misfit, refuse_activations,
)
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme

QUANT_METHOD = "gptq"
BITS = (2, 3, 4, 8)
LAYER_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
SCALE_DTYPE = torch.float16
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # what v1 subtracts from zero points before packing them


def check(recipe) -> None:
    """Refuse, before any work, a recipe whose layers this layout cannot hold."""
    refuse_activations(recipe)
    for scheme in recipe.schemes():
        if scheme.lut:
            raise QtoolError(f"{recipe.method} writes look-up-table weights, which --format gptq cannot hold; "
                             f"use --format qtool")
        if scheme.bits not in BITS:
            raise QtoolError(f"--format gptq holds 2, 3, 4 or 8-bit weights; {scheme.describe()} does not fit: "
                             f"use --format compressed-tensors")


def misfit(name: str, weight: QuantizedWeight) -> str | None:
    """Why `weight` cannot be stored in this layout without changing it, or None."""
    return (nonuniform_misfit(name, weight, "gptq") or activations_misfit(name, weight) or _grid_misfit(name, weight)
            or float16_misfit(name, weight.scales))


def _grid_misfit(name: str, weight: QuantizedWeight) -> str | None:
    bits = weight.scheme.bits
    if bits not in BITS:
        return f"{name}: {weight.scheme.describe()} does not fit --format gptq (2, 3, 4 or 8 bits); " \
               f"use --format compressed-tensors"
    word = 32 // math.gcd(32, bits)
    for side, size in (("input", weight.in_features), ("output", weight.out_features)):
        if size % word:
            return f"{name}: {size} {side} features do not fill whole {bits}-bit GPTQ words (a multiple of {word}); " \
                   f"use --format compressed-tensors"
    if weight.zeros is not None and bool((weight.zeros == 0).any()):
        return f"{name}: a zero point of 0 does not fit GPTQ v1 (it stores zero points minus one); " \
               f"use --format compressed-tensors"
    return None


def layer_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    bits = weight.scheme.bits
    g_idx = weight.g_idx
    if g_idx is None:
        g_idx = _contiguous_groups(weight.in_features, weight.scheme.group_size)
    stored_zeros = weight.zero_points() - ZERO_OFFSET["gptq"]
    return {
        f"{name}.qweight": weight.packed.t().contiguous(),
        f"{name}.qzeros": packing.pack(stored_zeros.t().contiguous(), bits),
        f"{name}.scales": weight.scales.to(SCALE_DTYPE).t().contiguous(),
        f"{name}.g_idx": g_idx.to(torch.int32),
    }


def _contiguous_groups(in_features: int, group_size: int) -> torch.Tensor:
    columns = torch.arange(in_features, dtype=torch.int32)
    return torch.zeros_like(columns) if group_size == -1 else columns // group_size


def _scheme_entry(scheme: Scheme, act_order: bool) -> dict:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.symmetric, "desc_act": act_order}


def _pattern(name: str) -> str:
    """A regex that re.match-es `name` and the fused layer vLLM makes of it, and nothing else."""
    fused = fused_name(name)
    leaves = [name.rpartition(".")[2]] + ([fused.rpartition(".")[2]] if fused else [])
    parent = name.rpartition(".")[0]
    stem = re.escape(parent) + r"\." if parent else ""
    return f"{stem}({'|'.join(leaves)})$" if fused else f"{re.escape(name)}$"


def quantization_config(weights: dict[str, QuantizedWeight], dense_linears: list[str]) -> dict:
    """The scheme most layers share is the base; the others get `dynamic` overrides, dense linears skips."""
    entries = {name: _scheme_entry(weight.scheme, weight.g_idx is not None) for name, weight in weights.items()}
    counts = Counter(tuple(sorted(entry.items())) for entry in entries.values())
    base = dict(min(counts, key=lambda key: (-counts[key], key))) if counts else _scheme_entry(Scheme(), False)
    dynamic = {f"-:{_pattern(name)}": {} for name in dense_linears}
    dynamic.update({f"+:{_pattern(name)}": entry for name, entry in entries.items() if entry != base})
    config = {"quant_method": QUANT_METHOD, **base, "checkpoint_format": "gptq", "lm_head": False}
    if dynamic:
        config["dynamic"] = dict(sorted(dynamic.items()))
    return config


def _rule(config: dict, name: str) -> tuple[str, dict] | None:
    """The first `dynamic` entry matching layer `name`: ("-", {}) to skip it, ("+", overrides)."""
    for pattern, overrides in (config.get("dynamic") or {}).items():
        sign = "-" if pattern.startswith("-:") else "+"
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), name):
            return sign, overrides or {}
    return None


def _settings(config: dict, name: str) -> dict:
    """The base settings with the first positive `dynamic` match for layer `name` over them."""
    rule = _rule(config, name)
    if rule is not None and rule[0] == "-":
        raise QtoolError(f"{name} has packed weights but quantization_config's dynamic skips it")
    return {**config, **(rule[1] if rule is not None else {})}


def act_order(config: dict, name: str, tensor_names) -> bool:
    """Whether layer `name` has act-order groups, as vLLM decides it: desc_act in its settings."""
    return bool(_settings(config, name).get("desc_act", False))


def layer_schemes(config: dict, layer_names: list[str]) -> dict[str, Scheme]:
    """The scheme of each layer: the base settings, with its first positive `dynamic` match over them."""
    format_name = config.get("checkpoint_format", "gptq")
    if format_name not in ZERO_OFFSET:
        raise QtoolError(f"GPTQ checkpoint_format {format_name!r} is not supported (only gptq, gptq_v2)")
    schemes = {}
    for name in layer_names:
        settings = _settings(config, name)
        try:
            bits, group_size = int(settings["bits"]), int(settings.get("group_size", -1))
            schemes[name] = Scheme(bits, group_size, symmetric=bool(settings.get("sym", True)))
        except (KeyError, TypeError, ValueError) as error:
            raise QtoolError(f"GPTQ quantization_config for {name} lacks or garbles a setting: {error}") from None
        if bits not in BITS:
            raise QtoolError(f"{name}: {bits}-bit GPTQ weights are not supported (2, 3, 4 or 8)")
    return schemes


def read_layer(name: str, tensors: dict[str, torch.Tensor], scheme: Scheme, zero_offset: int) -> QuantizedWeight:
    try:
        qweight, qzeros, scales = (tensors[f"{name}.{suffix}"] for suffix in LAYER_SUFFIXES[:3])
    except KeyError as missing:
        raise QtoolError(f"checkpoint is missing tensor {missing.args[0]}") from None
    bits = scheme.bits
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scheme.group_count(in_features)
    if scheme.group_size != -1 and in_features % scheme.group_size:
        raise QtoolError(f"{name}: group size {scheme.group_size} does not divide its {in_features} input features")
    if tuple(scales.shape) != (groups, out_features) or tuple(qzeros.shape) != (groups, out_features * bits // 32):
        raise QtoolError(f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                         f"{tuple(scales.shape)} do not fit {scheme.describe()}")
    zeros = packing.unpack(qzeros, bits, out_features).t() + zero_offset
    if bool((zeros >= 2**bits).any()):
        raise QtoolError(f"{name}: qzeros hold a zero point of {2**bits}, which is what a zero point of 0 becomes in "
                         f"GPTQ v1; re-export the checkpoint as gptq_v2")
    if scheme.symmetric:
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise QtoolError(f"{name}: sym is true but qzeros are not all {2 ** (bits - 1)}")
        zeros = None
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None:
        if tuple(g_idx.shape) != (in_features,) or bool((g_idx < 0).any() or (g_idx >= groups).any()):
            raise QtoolError(f"{name}: g_idx {tuple(g_idx.shape)} is not a group index for {in_features} input features")
        if torch.equal(g_idx.to(torch.int32), _contiguous_groups(in_features, scheme.group_size)):
            g_idx = None
    return QuantizedWeight(qweight.t().contiguous(), scales.t().contiguous(), None if zeros is None else zeros.contiguous(),
                           scheme, (out_features, in_features), None if g_idx is None else g_idx.to(torch.int32))


def read_layers(tensors: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    names = sorted(key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight"))
    schemes = layer_schemes(config, names)
    offset = ZERO_OFFSET[config.get("checkpoint_format", "gptq")]
    weights = {name: read_layer(name, tensors, schemes[name], offset) for name in names}
    return weights, dense_tensors(tensors, weights, LAYER_SUFFIXES)


def layer_shapes(folder: Path, names: list[str], infos: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each layer, from its qweight [in*b/32, out] and its bits."""
    schemes = layer_schemes(model_config(folder)["quantization_config"], names)
    return {name: (infos[f"{name}.qweight"].shape[1], infos[f"{name}.qweight"].shape[0] * 32 // schemes[name].bits)
            for name in names}


def dense_linears(config: dict) -> list[str]:
    """The layers `dynamic` skips, as their patterns say them (names for the ones qtool writes)."""
    skipped = [pattern.removeprefix("-:") for pattern in (config.get("dynamic") or {}) if pattern.startswith("-:")]
    names = (re.sub(r"\((\w+)\|\w+\)", r"\1", pattern) for pattern in skipped)  # (q_proj|qkv_proj) -> q_proj
    return [re.sub(r"\\(.)", r"\1", name).removesuffix("$") for name in names]

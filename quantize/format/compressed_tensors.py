"""compressed-tensors `pack-quantized`: the format vLLM and transformers load as it is.

Per quantized linear `NAME` (all packed along the last dimension of the stored tensor, as
`qtool.quantize.packing` draws it; codes stored unsigned, i.e. the signed value + 2**(bits-1)):

    NAME.weight_packed      int32 [out, ceil(in*bits/32)]   codes, packed along the input dimension
    NAME.weight_scale       model dtype [out, n_groups]
    NAME.weight_zero_point  int32 [ceil(out*bits/32), n_groups]   asymmetric only; packed along the
                            output dimension (the transpose is packed, then transposed back)
    NAME.weight_shape       int64 [2]                        (out, in)
    NAME.weight_g_idx       int32 [in]                       act-order with groups only

Dequantization: w = (q - zp) * scale with q, zp signed; qtool's unsigned codes and zero points
differ from them by the same 2**(bits-1), so (code - zero) * scale is the same number.

W8A8 layers (activations quantized to int8 per token at run time, the scheme vLLM runs as
INT8_W8A8) are `int-quantized` instead: `NAME.weight` int8 [out, in] (signed codes) and
`NAME.weight_scale` [out, 1], with the group's `input_activations` saying dynamic int8 per token.
`config.json` carries `quantization_config` with one `config_group` per distinct scheme and the
names of the linear layers left dense in `ignore`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from qtool.errors import QtoolError
from qtool.quantize import packing
from qtool.quantize.format.checkpoint import dense_tensors, weight_files
from qtool.quantize.format.layout import nonuniform_misfit
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme

QUANT_METHOD = "compressed-tensors"
KV_SCALES = True  # kv_cache_scheme (vLLM: --kv-cache-dtype fp8 reads the scales)
PACKED_FORMAT = "pack-quantized"
INT_FORMAT = "int-quantized"
MIXED_FORMAT = "mixed-precision"
PER_TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
COMPRESSED_TENSORS_VERSION = "0.19.0"
DENSE_STREAM_SINCE = (0, 18)  # earlier versions packed 32 // bits whole codes per word
LAYER_SUFFIXES = ("weight_scale", "weight_packed", "weight_zero_point", "weight_shape", "weight_g_idx", "weight")


def check(recipe) -> None:
    """Refuse, before any work, what compressed-tensors cannot hold: look-up-table weights."""
    if any(scheme.lut for scheme in recipe.schemes()):
        raise QtoolError(f"{recipe.method} writes look-up-table weights, which compressed-tensors cannot hold; "
                         f"use --format qtool")


def misfit(name: str, weight: QuantizedWeight) -> str | None:
    """Why `weight` cannot be stored in this layout, or None."""
    return nonuniform_misfit(name, weight, "compressed-tensors")


def layer_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors stored for one quantized layer."""
    if weight.scheme.activation_bits:
        return {f"{name}.weight": (weight.codes() - 128).to(torch.int8), f"{name}.weight_scale": weight.scales}
    tensors = {
        f"{name}.weight_packed": weight.packed,
        f"{name}.weight_scale": weight.scales,
        f"{name}.weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }
    if weight.zeros is not None:
        tensors[f"{name}.weight_zero_point"] = packing.pack(weight.zeros.t(), weight.scheme.bits).t().contiguous()
    if weight.g_idx is not None:
        tensors[f"{name}.weight_g_idx"] = weight.g_idx.to(torch.int32)
    return tensors


def read_layer(name: str, tensors: dict[str, torch.Tensor], scheme: Scheme) -> QuantizedWeight:
    """The `QuantizedWeight` of one layer from its stored tensors."""
    if f"{name}.weight_packed" not in tensors:
        return _read_int8_layer(name, tensors, scheme)
    try:
        packed = tensors[f"{name}.weight_packed"]
        scales = tensors[f"{name}.weight_scale"]
        out_features, in_features = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
    except KeyError as missing:
        raise QtoolError(f"checkpoint is missing tensor {missing.args[0]}") from None
    zero_point = tensors.get(f"{name}.weight_zero_point")
    if scheme.symmetric != (zero_point is None):
        state = "has" if zero_point is not None else "lacks"
        raise QtoolError(f"{name} {state} a zero point, which its {scheme.describe()} scheme contradicts")
    zeros = None
    if zero_point is not None:
        zeros = packing.unpack(zero_point.t().contiguous(), scheme.bits, out_features).t().contiguous()
    expected = (out_features, packing.packed_width(in_features, scheme.bits))
    if tuple(packed.shape) != expected or scales.shape[0] != out_features:
        raise QtoolError(
            f"{name}: weight_packed {tuple(packed.shape)} / weight_scale {tuple(scales.shape)} do not fit "
            f"shape {(out_features, in_features)} at {scheme.bits} bits"
        )
    g_idx = tensors.get(f"{name}.weight_g_idx")
    return QuantizedWeight(packed, scales, zeros, scheme, (out_features, in_features), g_idx)


def _read_int8_layer(name: str, tensors: dict[str, torch.Tensor], scheme: Scheme) -> QuantizedWeight:
    """An `int-quantized` layer: signed int8 codes [out, in] and a scale per output channel."""
    weight, scales = tensors.get(f"{name}.weight"), tensors[f"{name}.weight_scale"]
    if weight is None or weight.dtype != torch.int8 or scales.shape != (weight.shape[0], 1) or scheme.bits != 8:
        raise QtoolError(f"{name}: an int-quantized layer needs an int8 weight and a weight_scale per output "
                         f"channel under an 8-bit scheme")
    codes = weight.to(torch.int32) + 128
    return QuantizedWeight(packing.pack(codes, 8), scales, None, scheme, tuple(weight.shape))


def _weights_args(scheme: Scheme, act_order: bool) -> dict:
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "actorder": "group" if act_order else None,
        "dynamic": False,
        "observer": "minmax",
        "block_structure": None,
    }


def quantization_config(weights: dict[str, QuantizedWeight], dense_linears: list[str]) -> dict:
    """`quantization_config` for config.json: one config group per distinct scheme, and `ignore`."""
    by_scheme: dict[tuple[Scheme, bool], list[str]] = {}
    for name, weight in weights.items():
        by_scheme.setdefault((weight.scheme, weight.g_idx is not None), []).append(name)
    single = len(by_scheme) == 1
    groups = {}
    for index, ((scheme, act_order), names) in enumerate(sorted(by_scheme.items(), key=lambda item: item[1][0])):
        groups[f"group_{index}"] = {
            "targets": ["Linear"] if single else sorted(names),
            "weights": _weights_args(scheme, act_order),
            "input_activations": dict(PER_TOKEN_INT8) if scheme.activation_bits else None,
            "output_activations": None,
            "format": INT_FORMAT if scheme.activation_bits else PACKED_FORMAT,
        }
    formats = {group["format"] for group in groups.values()}
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else MIXED_FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(dense_linears),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def _scheme_from_args(args: dict, group: str) -> Scheme:
    if args.get("type", "int") != "int":
        raise QtoolError(f"config group {group}: weights of type {args.get('type')!r} are not supported (only int)")
    strategy = args.get("strategy")
    if strategy not in ("group", "channel"):
        raise QtoolError(f"config group {group}: weight strategy {strategy!r} is not supported (group or channel)")
    group_size = int(args["group_size"]) if strategy == "group" else -1
    return Scheme(bits=int(args["num_bits"]), group_size=group_size, symmetric=bool(args.get("symmetric", True)))


def _target_rank(target: str, name: str) -> int | None:
    """How specifically `target` names layer `name` (lower is more specific), or None if it does not."""
    if target == name:
        return 0
    if target.startswith("re:") and re.match(target[3:], name):
        return 1
    if target == "Linear":
        return 2
    return None


def _version(config: dict) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(config.get("version", "")).split(".")[:2])
    except ValueError:
        return DENSE_STREAM_SINCE


def layer_schemes(config: dict, layer_names: list[str]) -> dict[str, Scheme]:
    """The scheme of each quantized layer, by the most specific config group targeting it."""
    groups = {}
    for group, body in (config.get("config_groups") or {}).items():
        body_format = body.get("format") or config.get("format")
        if body_format not in (PACKED_FORMAT, INT_FORMAT):
            raise QtoolError(f"config group {group}: format {body_format!r} is not supported "
                             f"({PACKED_FORMAT} or {INT_FORMAT})")
        scheme = _scheme_from_args(body.get("weights") or {}, group)
        activations = body.get("input_activations")
        if activations:
            if {key: activations.get(key) for key in PER_TOKEN_INT8} != PER_TOKEN_INT8:
                raise QtoolError(f"config group {group}: only dynamic int8 per-token activations are supported")
            scheme = Scheme(scheme.bits, scheme.group_size, scheme.symmetric, activation_bits=8)
        if 32 % scheme.bits and _version(config) < DENSE_STREAM_SINCE:
            raise QtoolError(
                f"config group {group}: {scheme.bits}-bit weights written by compressed-tensors "
                f"{config.get('version')} use the pre-0.18 packing, which qtool does not read; re-export them"
            )
        groups[group] = (scheme, body.get("targets") or [])
    schemes = {}
    for name in layer_names:
        best: tuple[int, Scheme] | None = None
        for scheme, targets in groups.values():
            for target in targets:
                rank = _target_rank(target, name)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, scheme)
        if best is None:
            raise QtoolError(f"{name} has quantized weights but no config group targets it")
        schemes[name] = best[1]
    return schemes


def read_layers(tensors: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """Split stored tensors into quantized layers and the dense tensors beside them."""
    names = sorted(key.removesuffix(".weight_scale") for key in tensors if key.endswith(".weight_scale"))
    schemes = layer_schemes(config, names)
    weights = {name: read_layer(name, tensors, schemes[name]) for name in names}
    return weights, dense_tensors(tensors, weights, LAYER_SUFFIXES)


def layer_shapes(folder: Path, names: list[str], infos: dict) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of each quantized layer, read from its small `weight_shape` tensor
    (int-quantized layers: their int8 weight's shape)."""
    wanted = {f"{name}.weight_shape": name for name in names}
    shapes = {name: tuple(infos[f"{name}.weight"].shape) for name in names if f"{name}.weight" in infos}
    for file in weight_files(folder):
        with safe_open(file, framework="pt") as reader:
            for key in wanted.keys() & set(reader.keys()):
                out_features, in_features = reader.get_tensor(key).tolist()
                shapes[wanted[key]] = (int(out_features), int(in_features))
    return shapes


def act_order(config: dict, name: str, tensor_names) -> bool:
    """Whether layer `name` has act-order groups: it stores a g_idx."""
    return f"{name}.weight_g_idx" in tensor_names


def dense_linears(config: dict) -> list[str]:
    return list(config.get("ignore") or [])

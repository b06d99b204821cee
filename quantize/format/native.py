"""qtool's own format, for what no other format holds: non-uniform (look-up table) weights and
dense-and-sparse outliers. It holds uniform grids too, so one checkpoint can mix both.

Per quantized linear `NAME` (out x in, b bits, G groups per row; see docs/format.md):

    NAME.weight_packed        int32 [out, ceil(in*b/32)]   codes, packed as compressed-tensors packs them
    NAME.weight_shape         int64 [2]                    (out, in)
    NAME.weight_lut           float16 [out, G, 2**b]       LUT weights: the value of each code
    NAME.weight_scale         model dtype [out, G]         uniform grids: scales
    NAME.weight_zero_point    int32 [out, G]               uniform asymmetric grids: zero points (unpacked)
    NAME.weight_g_idx         int32 [in]                   uniform grids with act-order groups
    NAME.outlier_values       float16 [nnz]                sparse part, CSR: added to the dense weight
    NAME.outlier_columns      int32 [nnz]
    NAME.outlier_row_offsets  int32 [out + 1]

`config.json` carries `quantization_config` with quant_method `qtool`, the format version, one
entry per distinct scheme listing its layers, and the linears left dense in `ignore`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.quantize import packing
from qtool.quantize.format.checkpoint import dense_tensors
from qtool.quantize.format.compressed_tensors import act_order, layer_shapes  # noqa: F401 (the same tensors)
from qtool.quantize.qweight import OUTLIER_FIELDS, QuantizedWeight, SparseOutliers
from qtool.quantize.scheme import Scheme

QUANT_METHOD = "qtool"
KV_SCALES = True  # kv_cache_scheme and <attention>.k_scale / .v_scale, as compressed-tensors has them
VERSION = 1
LAYER_SUFFIXES = ("weight_packed", "weight_shape", "weight_lut", "weight_scale", "weight_zero_point", "weight_g_idx",
                  "outlier_values", "outlier_columns", "outlier_row_offsets")


def layer_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    stored = {
        "weight_packed": weight.packed,
        "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        "weight_lut": weight.lut,
        "weight_scale": weight.scales,
        "weight_zero_point": weight.zeros,
        "weight_g_idx": None if weight.g_idx is None else weight.g_idx.to(torch.int32),
    }
    if weight.outliers is not None:
        stored.update({f"outlier_{field}": getattr(weight.outliers, field) for field in OUTLIER_FIELDS})
    return {f"{name}.{suffix}": tensor for suffix, tensor in stored.items() if tensor is not None}


def _scheme_entry(scheme: Scheme) -> dict:
    entry = {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric, "lut": scheme.lut}
    return {**entry, "activation_bits": scheme.activation_bits} if scheme.activation_bits else entry


def quantization_config(weights: dict[str, QuantizedWeight], dense_linears: list[str]) -> dict:
    by_scheme: dict[Scheme, list[str]] = {}
    for name, weight in weights.items():
        by_scheme.setdefault(weight.scheme, []).append(name)
    schemes = [{**_scheme_entry(scheme), "layers": sorted(names)} for scheme, names in by_scheme.items()]
    return {
        "quant_method": QUANT_METHOD,
        "version": VERSION,
        "schemes": sorted(schemes, key=lambda entry: entry["layers"][0]),
        "ignore": sorted(dense_linears),
    }


def layer_schemes(config: dict, layer_names: list[str]) -> dict[str, Scheme]:
    if config.get("version") != VERSION:
        raise QtoolError(f"qtool checkpoint format version {config.get('version')!r} is not supported (only {VERSION}); "
                         f"re-export it with this qtool")
    schemes = {}
    for entry in config.get("schemes") or []:
        try:
            scheme = Scheme(int(entry["bits"]), int(entry["group_size"]), bool(entry["symmetric"]), bool(entry["lut"]),
                            entry.get("activation_bits"))
            schemes.update(dict.fromkeys(entry["layers"], scheme))
        except (KeyError, TypeError, ValueError) as error:
            raise QtoolError(f"quantization_config has a malformed scheme entry {entry!r}: {error}") from None
    unknown = [name for name in layer_names if name not in schemes]
    if unknown:
        raise QtoolError(f"{unknown[0]} has packed weights but no scheme in quantization_config lists it")
    return {name: schemes[name] for name in layer_names}


def read_layer(name: str, tensors: dict[str, torch.Tensor], scheme: Scheme) -> QuantizedWeight:
    def get(suffix: str, needed: bool = False) -> torch.Tensor | None:
        tensor = tensors.get(f"{name}.{suffix}")
        if tensor is None and needed:
            raise QtoolError(f"checkpoint is missing tensor {name}.{suffix}")
        return tensor

    out_features, in_features = (int(v) for v in get("weight_shape", True).tolist())
    packed = get("weight_packed", True)
    groups = scheme.group_count(in_features)
    if tuple(packed.shape) != (out_features, packing.packed_width(in_features, scheme.bits)):
        raise QtoolError(f"{name}: weight_packed {tuple(packed.shape)} does not fit shape {(out_features, in_features)} "
                         f"at {scheme.bits} bits")
    lut = get("weight_lut", scheme.lut)
    scales = None if scheme.lut else get("weight_scale", True)
    zeros = None if scheme.lut or scheme.symmetric else get("weight_zero_point", True)
    expected = {"weight_lut": (out_features, groups, 2**scheme.bits)} if scheme.lut else {"weight_scale": (out_features, groups)}
    for suffix, shape in expected.items():
        if tuple(get(suffix).shape) != shape:
            raise QtoolError(f"{name}: {suffix} {tuple(get(suffix).shape)} should be {shape} for {scheme.describe()}")
    outliers = None
    if get("outlier_values") is not None:
        outliers = SparseOutliers(*(get(f"outlier_{field}", True) for field in OUTLIER_FIELDS))
        if len(outliers.row_offsets) != out_features + 1 or len(outliers.columns) != len(outliers.values):
            raise QtoolError(f"{name}: the outlier tensors do not describe a sparse [{out_features}, {in_features}] matrix")
    return QuantizedWeight(packed, scales, zeros, scheme, (out_features, in_features), get("weight_g_idx"), lut, outliers)


def read_layers(tensors: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    names = sorted(key.removesuffix(".weight_packed") for key in tensors if key.endswith(".weight_packed"))
    schemes = layer_schemes(config, names)
    weights = {name: read_layer(name, tensors, schemes[name]) for name in names}
    return weights, dense_tensors(tensors, weights, LAYER_SUFFIXES)


def dense_linears(config: dict) -> list[str]:
    return list(config.get("ignore") or [])

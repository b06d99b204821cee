"""AutoAWQ's `gemm` layout, for the tools that want AWQ checkpoints (AutoAWQ, vLLM's AWQ kernels).

Per quantized linear `NAME`, 4-bit codes with a zero point per group of input rows:

    NAME.qweight  int32 [in, out/8]          codes of 8 output channels per word; nibble j (bits
                                             4j..4j+3) holds channel AWQ_ORDER[j] of the eight
    NAME.qzeros   int32 [in/group, out/8]    zero points, packed the same way
    NAME.scales   float16 [in/group, out]

Dequantization: w[o, i] = (q - z) * s, as qtool's own. Symmetric weights are stored with their
implied zero point (8), so they read back as asymmetric ones with the same values. The layout has
no act-order (`g_idx`), no other bit width, no per-channel grid and no look-up tables; such recipes are refused
before any work. `config.json` carries quant_method awq, version gemm, and the dense linears in
`modules_to_not_convert`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.errors import FAILURE, QtoolError
from qtool.quantize import packing
from qtool.quantize.format.checkpoint import dense_tensors
from qtool.quantize.format.layout import float16_misfit, nonuniform_misfit
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme

QUANT_METHOD = "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LAYER_SUFFIXES = ("qweight", "qzeros", "scales")
SCALE_DTYPE = torch.float16  # what AWQ kernels expect; grids are fitted against float16 scales


def check(recipe) -> None:
    """Refuse, before any work, a recipe whose layers this layout cannot hold."""
    for scheme in recipe.schemes():
        if scheme.bits != 4 or scheme.group_size == -1 or scheme.lut:
            raise QtoolError(f"--format awq holds 4-bit weights with a group size; {scheme.describe()} does not "
                             f"fit: use --bits 4 and a --group-size, or --format compressed-tensors")
    if recipe.method in ("gptq", "awq+gptq") and recipe.gptq.act_order == "group":
        raise QtoolError("--format awq has no g_idx for --act-order group; use --act-order static")


def _interleave(codes: torch.Tensor) -> torch.Tensor:
    """[rows, out] codes -> int32 [rows, out/8] words in AWQ's channel order."""
    rows, out_features = codes.shape
    ordered = codes.reshape(rows, out_features // 8, 8)[..., list(AWQ_ORDER)].reshape(rows, out_features)
    return packing.pack(ordered, 4)


def _deinterleave(words: torch.Tensor, out_features: int) -> torch.Tensor:
    ordered = packing.unpack(words, 4, out_features).reshape(words.shape[0], out_features // 8, 8)
    return ordered[..., torch.argsort(torch.tensor(AWQ_ORDER))].reshape(words.shape[0], out_features)


def misfit(name: str, weight: QuantizedWeight) -> str | None:
    """Why `weight` cannot be stored in this layout without changing it, or None."""
    return nonuniform_misfit(name, weight, "awq") or _grid_misfit(name, weight) or float16_misfit(name, weight.scales)


def _grid_misfit(name: str, weight: QuantizedWeight) -> str | None:
    if weight.scheme.bits != 4 or weight.scheme.group_size == -1:
        return f"{name}: {weight.scheme.describe()} does not fit --format awq (4 bits with a group size); " \
               f"use --format compressed-tensors"
    if weight.g_idx is not None:
        return f"{name}: act-order groups (g_idx) do not fit --format awq; use --format gptq or compressed-tensors"
    if weight.out_features % 8:
        return f"{name}: {weight.out_features} output channels do not fill AWQ's words of 8; " \
               f"use --format compressed-tensors"
    return None


def layer_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {
        f"{name}.qweight": _interleave(weight.codes().t().contiguous()),
        f"{name}.qzeros": _interleave(weight.zero_points().t().contiguous()),
        f"{name}.scales": weight.scales.to(SCALE_DTYPE).t().contiguous(),
    }


def quantization_config(weights: dict[str, QuantizedWeight], dense_linears: list[str]) -> dict:
    group_sizes = {weight.scheme.group_size for weight in weights.values()}
    if len(group_sizes) != 1:
        raise QtoolError(f"--format awq has one group size per model; the layers use {sorted(group_sizes)}", FAILURE)
    return {
        "quant_method": QUANT_METHOD,
        "version": "gemm",
        "bits": 4,
        "group_size": group_sizes.pop(),
        "zero_point": True,
        "modules_to_not_convert": sorted(dense_linears),
    }


def layer_schemes(config: dict, layer_names: list[str]) -> dict[str, Scheme]:
    if config.get("version", "gemm").lower() != "gemm" or int(config.get("bits", config.get("w_bit", 4))) != 4:
        raise QtoolError(f"AWQ checkpoints of version {config.get('version')!r} and {config.get('bits')} bits are "
                         f"not supported (only gemm, 4 bits)")
    group_size = int(config.get("group_size", config.get("q_group_size", 128)))
    return dict.fromkeys(layer_names, Scheme(4, group_size, symmetric=False))


def read_layers(tensors: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    names = sorted(key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight"))
    schemes = layer_schemes(config, names)
    weights = {}
    for name in names:
        try:
            qweight, qzeros, scales = (tensors[f"{name}.{suffix}"] for suffix in LAYER_SUFFIXES)
        except KeyError as missing:
            raise QtoolError(f"checkpoint is missing tensor {missing.args[0]}") from None
        in_features, out_features = qweight.shape[0], scales.shape[1]
        if qweight.shape[1] * 8 != out_features or scales.shape[0] * schemes[name].group_size != in_features:
            raise QtoolError(f"{name}: qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not fit "
                             f"group size {schemes[name].group_size}")
        codes = _deinterleave(qweight, out_features).t().contiguous()
        zeros = _deinterleave(qzeros, out_features).t().contiguous()
        weights[name] = QuantizedWeight(packing.pack(codes, 4), scales.t().contiguous(), zeros, schemes[name],
                                        (out_features, in_features))
    return weights, dense_tensors(tensors, weights, LAYER_SUFFIXES)


def layer_shapes(folder: Path, names: list[str], infos: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each quantized layer, from the shape of its qweight [in, out/8]."""
    return {name: (8 * infos[f"{name}.qweight"].shape[1], infos[f"{name}.qweight"].shape[0]) for name in names}


def act_order(config: dict, name: str, tensor_names) -> bool:
    return False  # the layout has no g_idx


def dense_linears(config: dict) -> list[str]:
    return list(config.get("modules_to_not_convert") or [])

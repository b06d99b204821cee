"""What vLLM makes of a checkpoint's layers under tensor parallelism: per-rank shapes, the rules
they break, and the kernel each layer would get. Conservative rules, read from vLLM's public
source (0.9-0.12: `kernels/mixed_precision/{machete,marlin,exllama}.py`, `utils/marlin_utils.py`,
`gptq_marlin.py`, `awq_marlin.py`, `gptq.py`, `awq.py`); docs/format.md lists them.

Tensor parallelism: vLLM splits o_proj and down_proj along their input (row-parallel) and every
other linear along its output (column-parallel). Kernels are tried in vLLM's order of preference:
Machete (Hopper, sm90 only), Marlin (sm80 and later), Exllama (float16 activations only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qtool.quantize.format.layout import fused_name
from qtool.quantize.scheme import Scheme

ROW_PARALLEL = ("o_proj", "down_proj")
MARLIN_GROUPS = (-1, 32, 64, 128)
MACHETE_GROUPS = (-1, 64, 128)
GPUS = ("sm90", "sm80")  # Hopper (H100/H200), Ampere/Ada (A100, L40S, RTX 30/40)


@dataclass(frozen=True)
class Layer:
    """One quantized linear as vLLM sees it: its name, (out, in), scheme and whether it has act-order groups."""

    name: str
    shape: tuple[int, int]
    scheme: Scheme
    act_order: bool


@dataclass
class LayerPlan:
    name: str
    parallel: str  # "row" or "column"
    rank_shape: tuple[int, int]  # (out, in) on each rank
    kernels: dict[str, str]  # GPU class -> kernel name, "none" where vLLM cannot run the layer
    warnings: list[str] = field(default_factory=list)


def _rank_shape(layer: Layer, tp: int) -> tuple[str, tuple[int, int]]:
    out_features, in_features = layer.shape
    if layer.name.rpartition(".")[2] in ROW_PARALLEL:
        return "row", (out_features, in_features // tp)
    return "column", (out_features // tp, in_features)


def machete(layer: Layer, rank: tuple[int, int], row_split: bool) -> str | None:
    """Why Machete cannot run the layer, or None."""
    if layer.scheme.bits not in (4, 8):
        return f"W{layer.scheme.bits}"
    if layer.act_order and row_split:
        return "act-order with the input split"
    if layer.scheme.group_size not in MACHETE_GROUPS:
        return f"group size {layer.scheme.group_size}"
    if rank[1] % 64 or rank[0] % 128:
        return "per-rank in % 64 or out % 128"
    return None


def marlin(layer: Layer, rank: tuple[int, int]) -> str | None:
    """Why Marlin cannot run the layer, or None."""
    scheme = layer.scheme
    if scheme.bits not in (4, 8):
        return f"W{scheme.bits}"
    if scheme.group_size not in MARLIN_GROUPS:
        return f"group size {scheme.group_size}"
    if rank[0] % 64 or rank[1] % 128:
        return "per-rank out % 64 or in % 128"
    if 0 < scheme.group_size < layer.shape[1] and rank[1] % scheme.group_size:
        return "per-rank in % group size"
    return None


def exllama(layer: Layer, rank: tuple[int, int], row_split: bool) -> str | None:
    """Why Exllama cannot run the layer, or None (float16 activations only)."""
    scheme = layer.scheme
    if not scheme.symmetric or scheme.bits not in (4, 8):
        return scheme.describe()
    if layer.act_order and row_split:
        return "act-order with the input split"
    if rank[0] % (32 // scheme.bits):
        return "per-rank out % pack factor"
    return None


def _mixed_precision_kernel(layer: Layer, rank: tuple[int, int], row_split: bool, gpu: str) -> str:
    """vLLM's choice among its mixed-precision kernels (compressed-tensors, gptq_marlin)."""
    if gpu == "sm90" and machete(layer, rank, row_split) is None:
        return "Machete"
    if marlin(layer, rank) is None:
        return "Marlin"
    if exllama(layer, rank, row_split) is None:
        return "Exllama (fp16)"
    return "none"


def _gptq_kernel(layer: Layer, rank: tuple[int, int], row_split: bool, gpu: str, marlin_path: bool) -> str:
    if marlin_path:
        return _mixed_precision_kernel(layer, rank, row_split, gpu)
    if layer.scheme.group_size > 0 and rank[1] % layer.scheme.group_size:
        return "none"
    return "none" if rank[0] % (32 // math.gcd(32, layer.scheme.bits)) else "GPTQ exllama (gptq_gemm)"


def _awq_kernel(layer: Layer, rank: tuple[int, int], marlin_path: bool) -> str:
    if marlin_path and marlin(layer, rank) is None:
        return "Marlin"
    if rank[1] % layer.scheme.group_size or rank[0] % 8:
        return "none"
    return "AWQ gemm"


def gptq_uses_marlin(base: Scheme) -> bool:
    """vLLM picks gptq_marlin for a whole GPTQ model when its base settings are 4 or 8-bit symmetric
    with a Marlin group size (on sm80+); else the gptq method."""
    return base.symmetric and base.bits in (4, 8) and base.group_size in MARLIN_GROUPS


def plan(format_name: str, layers: list[Layer], tp: int, base: Scheme | None = None,
         dense: tuple[str, ...] = ()) -> list[LayerPlan]:
    """Each layer's per-rank shape, the tensor-parallel rules it breaks and its kernel per GPU class.
    `base`: the model-wide scheme of gptq and awq checkpoints (vLLM picks their Marlin path from it);
    `dense`: the linears left unquantized (None stands for them among a fused layer's schemes)."""
    schemes_of_fused: dict[str, set[Scheme | None]] = {}
    for name, scheme in [*((layer.name, layer.scheme) for layer in layers), *((name, None) for name in dense)]:
        if fused_name(name):
            schemes_of_fused.setdefault(fused_name(name), set()).add(scheme)
    plans = []
    for layer in layers:
        parallel, rank = _rank_shape(layer, tp)
        row_split = parallel == "row" and tp > 1
        warnings = _split_warnings(layer, parallel, rank, tp)
        fused = fused_name(layer.name)
        if fused and len(schemes_of_fused[fused]) > 1:
            warnings.append(f"vLLM fuses it into {fused.rpartition('.')[2]}, whose parts have different schemes "
                            f"(or are not all quantized)")
        kernels = {gpu: _kernel(format_name, layer, rank, row_split, gpu, base) for gpu in GPUS}
        warnings += [f"no vLLM kernel runs it on {gpu}" for gpu, kernel in kernels.items() if kernel == "none"]
        plans.append(LayerPlan(layer.name, parallel, rank, kernels, warnings))
    return plans


def _kernel(format_name: str, layer: Layer, rank, row_split: bool, gpu: str, base: Scheme | None) -> str:
    if layer.scheme.lut or format_name == "qtool":
        return "none"
    if format_name == "compressed-tensors" and layer.scheme.activation_bits:
        return "CUTLASS scaled_mm (int8 W8A8)"
    if format_name == "compressed-tensors":
        return _mixed_precision_kernel(layer, rank, row_split, gpu)
    if format_name == "gptq":
        return _gptq_kernel(layer, rank, row_split, gpu, gptq_uses_marlin(base or layer.scheme))
    if format_name == "awq":
        return _awq_kernel(layer, rank, base is None or base.group_size in MARLIN_GROUPS)
    return "none"


def _split_warnings(layer: Layer, parallel: str, rank: tuple[int, int], tp: int) -> list[str]:
    out_features, in_features = layer.shape
    side, split = ("input", in_features) if parallel == "row" else ("output", out_features)
    if split % tp:
        return [f"{split} {side} features do not split into {tp} ranks"]
    warnings = []
    group = layer.scheme.group_size
    if 0 < group < in_features and rank[1] % group:
        warnings.append(f"{rank[1]} input features per rank are not a multiple of the group size {group}")
    if rank[1] % 128:
        warnings.append(f"{rank[1]} input features per rank are not a multiple of 128 (Marlin)")
    if rank[0] % 64:
        warnings.append(f"{rank[0]} output features per rank are not a multiple of 64 (Marlin)")
    return warnings


def base_scheme(format_name: str, config: dict) -> Scheme | None:
    """The model-wide settings vLLM reads from a gptq or awq quantization_config (None for others)."""
    if format_name == "gptq":
        return Scheme(int(config["bits"]), int(config.get("group_size", -1)), bool(config.get("sym", True)))
    if format_name == "awq":
        return Scheme(4, int(config.get("group_size", config.get("q_group_size", 128))), False)
    return None

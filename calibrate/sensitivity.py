"""What quantizing each linear layer costs under each candidate scheme: the numbers a size budget
is spent against (`qtool.quantize.allocate`).

- `fisher` (the default): sum_i F_i (w_i - q(w_i))^2 with F the diagonal Fisher information of
  the weights (the one SqueezeLLM uses). To second order this is the loss increase the rounding
  causes, it adds up over layers, and it needs one rounding per layer and scheme.
- `kl`: the KL divergence of the model's next-token distributions from the original's, on a few
  calibration windows, when only that layer is quantized. It sees what the Fisher's diagonal
  misses (how errors interact inside a layer) at the price of one forward per layer and scheme.

Rounding is to nearest (min-max grids, or searched ones with `mse`): a proxy for what GPTQ or
AWQ will do, the same for every candidate, so it ranks schemes and layers fairly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qtool.calibrate.pipeline import block_linears
from qtool.errors import QtoolError
from qtool.quantize.methods import round_to_nearest
from qtool.quantize.scheme import Recipe, Scheme

SENSITIVITIES = ("fisher", "kl")
DENSE = None  # a layer left in the stored dtype: always a candidate, at no cost
KL_WINDOWS = 4  # calibration windows the KL of each layer and scheme is measured on
DEFAULT_CANDIDATES = "3g64,4g128,4g64,4g32,8cs,dense"  # `qtool quantize --help` repeats it


def parse_candidates(text: str) -> list[Scheme | None]:
    """Schemes from a comma-separated list: BITSgGROUP (asymmetric, e.g. 4g64), with an `s` for
    symmetric (4g64s), BITSc for per channel (8cs), and `dense` for the stored dtype."""
    candidates: list[Scheme | None] = []
    for item in (part.strip() for part in text.split(",")):
        candidates.append(DENSE if item == "dense" else _scheme_of(item))
    if len(set(candidates)) != len(candidates):
        raise QtoolError(f"--candidates {text!r} names a scheme twice")
    return candidates


def _scheme_of(item: str) -> Scheme:
    symmetric = item.endswith("s")
    body = item.removesuffix("s")
    try:
        if body.endswith("c"):
            return Scheme(int(body[:-1]), -1, symmetric)
        bits, group = body.split("g")
        return Scheme(int(bits), int(group), symmetric)
    except (ValueError, QtoolError):
        raise QtoolError(f"cannot read candidate scheme {item!r}; write e.g. 4g64 (asymmetric), 4g64s "
                         f"(symmetric), 8cs (per channel, symmetric) or dense") from None


def candidate_name(scheme: Scheme | None) -> str:
    """The inverse of `parse_candidates` for one scheme."""
    if scheme is None:
        return "dense"
    group = "c" if scheme.group_size == -1 else f"g{scheme.group_size}"
    return f"{scheme.bits}{group}{'s' if scheme.symmetric else ''}"


def fits(scheme: Scheme | None, in_features: int) -> bool:
    return scheme is None or scheme.group_size == -1 or in_features % scheme.group_size == 0


def rounded(weight: torch.Tensor, scheme: Scheme, recipe: Recipe, scale_dtype: torch.dtype):
    """`weight` rounded to nearest on `scheme`'s grid: the QuantizedWeight (for its stored size)."""
    return round_to_nearest(weight, scheme, recipe=recipe, scale_dtype=scale_dtype).weight


def fisher_costs(layers: Mapping[str, Callable[[], torch.Tensor]], fisher: Mapping[str, torch.Tensor],
                 candidates: list[Scheme | None], recipe: Recipe, scale_dtype: torch.dtype,
                 on_layer: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """{layer: {candidate name: sum F (w - q(w))^2}} for every candidate the layer's shape allows;
    `layers` maps each name to a function reading its float32 weight."""
    costs = {}
    for name, read in layers.items():
        weight, sensitivity = read(), fisher[name].float()
        costs[name] = {}
        for scheme in candidates:
            if fits(scheme, weight.shape[1]):
                error = 0.0 if scheme is None else _weighted_error(weight, rounded(weight, scheme, recipe, scale_dtype),
                                                                   sensitivity)
                costs[name][candidate_name(scheme)] = error
        if on_layer is not None:
            on_layer(name)
    return costs


def _weighted_error(weight: torch.Tensor, quantized, sensitivity: torch.Tensor) -> float:
    return float((sensitivity * (weight - quantized.dequantize()).square()).sum(dtype=torch.float64))


def kl_costs(model: nn.Module, windows: torch.Tensor, candidates: list[Scheme | None], recipe: Recipe,
             scale_dtype: torch.dtype, on_layer: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """{layer: {candidate name: mean KL(original || layer quantized) per token}} on `windows`
    [n, seqlen] of a fully loaded `model`, each layer quantized alone and restored after."""
    with torch.no_grad():
        reference = F.log_softmax(model(windows).logits.float(), dim=-1)
        costs = {}
        for name, linear in block_linears(model).items():
            original = linear.weight.data
            costs[name] = {}
            for scheme in candidates:
                if not fits(scheme, linear.in_features):
                    continue
                if scheme is not None:
                    quantized = rounded(original.float(), scheme, recipe, scale_dtype)
                    linear.weight.data = quantized.dequantize(original.dtype)
                costs[name][candidate_name(scheme)] = _mean_kl(reference, model(windows).logits.float())
                linear.weight.data = original
            if on_layer is not None:
                on_layer(name)
    return costs


def _mean_kl(reference_log_probs: torch.Tensor, logits: torch.Tensor) -> float:
    log_probs = F.log_softmax(logits, dim=-1)
    per_token = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(dim=-1)
    return float(per_token.mean().clamp(min=0))

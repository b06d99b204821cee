"""What several layer layouts share: scales a format stores in float16, and the linears vLLM fuses."""

from __future__ import annotations

import torch

from qtool.errors import QtoolError

VLLM_FUSED = {  # vLLM loads these linears of one block as one layer, so they must share a scheme
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def fused_name(name: str) -> str | None:
    """The name vLLM gives the fused layer `name` belongs to (None if vLLM keeps it apart)."""
    parent, _, leaf = name.rpartition(".")
    for fused, members in VLLM_FUSED.items():
        if leaf in members:
            return f"{parent}.{fused}" if parent else fused
    return None


def nonuniform_misfit(name: str, weight, format_name: str) -> str | None:
    """Why an integer-grid layout cannot hold `weight`: look-up tables or sparse outliers (or None)."""
    if weight.scheme.lut or weight.outliers is not None:
        return f"{name}: look-up tables and sparse outliers do not fit --format {format_name}; use --format qtool"
    return None


ACTIVATIONS_REFUSAL = ("8-bit activations (W8A8) are written in compressed-tensors (int-quantized) or qtool's "
                       "format; use --format compressed-tensors")


def activations_misfit(name: str, weight) -> str | None:
    """Why a weight-only layout cannot hold `weight`: its activations are quantized too (or None)."""
    return f"{name}: {ACTIVATIONS_REFUSAL}" if weight.scheme.activation_bits else None


def refuse_activations(recipe) -> None:
    """Refuse, up front, a recipe that quantizes activations (the weight-only layouts' `check`)."""
    if any(scheme.activation_bits for scheme in recipe.schemes()):
        raise QtoolError(ACTIVATIONS_REFUSAL)


def float16_misfit(name: str, scales: torch.Tensor) -> str | None:
    """Why a layout that stores scales in float16 cannot hold `scales` unchanged (or None)."""
    if not torch.equal(scales.to(torch.float16).to(scales.dtype), scales):
        return f"{name}: scales do not fit float16 exactly; use --format compressed-tensors"
    return None

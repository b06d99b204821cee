"""`QuantizedWeight`: the canonical in-memory form of one quantized linear layer.

Every method produces it, every writer and reader converts to and from it, and the runtime's
`QuantLinear` computes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.quantize import packing
from qtool.quantize.grid import Grid, dequantize_codes
from qtool.quantize.scheme import Scheme


@dataclass
class QuantizedWeight:
    """packed: int32 [out, ceil(in*bits/32)], codes packed along the input dimension (see packing).
    scales: [out, n_groups] in the model dtype. zeros: int32 [out, n_groups], asymmetric only
    (symmetric grids have the implied zero 2**(bits-1)). g_idx: int32 [in], the group of each input
    column when groups do not follow column order (act-order); None means contiguous groups.
    shape: the original (out, in)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    scheme: Scheme
    shape: tuple[int, int]
    g_idx: torch.Tensor | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, grid: Grid, scheme: Scheme, g_idx: torch.Tensor | None = None):
        return cls(
            packed=packing.pack(codes, scheme.bits),
            scales=grid.scales,
            zeros=None if scheme.symmetric else grid.zeros,
            scheme=scheme,
            shape=tuple(codes.shape),
            g_idx=g_idx,
        )

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return QuantizedWeight(move(self.packed), move(self.scales), move(self.zeros), self.scheme, self.shape, move(self.g_idx))

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Split along the output dimension: layers quantized together (one shared input) come
        apart into their own weights."""
        def part(tensor, start, size):
            return None if tensor is None else tensor[start : start + size].contiguous()

        parts, start = [], 0
        for size in sizes:
            parts.append(QuantizedWeight(
                part(self.packed, start, size), part(self.scales, start, size), part(self.zeros, start, size),
                self.scheme, (size, self.in_features), self.g_idx,
            ))
            start += size
        return parts

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def codes(self) -> torch.Tensor:
        return packing.unpack(self.packed, self.scheme.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """Zero points [out, n_groups], the implied ones included for symmetric grids."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, 2 ** (self.scheme.bits - 1), dtype=torch.int32, device=self.scales.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] the codes stand for, computed in float32 and cast to `dtype`."""
        codes = self.codes()
        if self.g_idx is None:
            return dequantize_codes(codes, self.scales, self.zero_points(), self.scheme.group_size).to(dtype)
        index = self.g_idx.long()
        scales = self.scales.float()[:, index]
        zeros = self.zero_points()[:, index]
        return ((codes - zeros).float() * scales).to(dtype)

"""`QuantizedWeight`: the canonical in-memory form of one quantized linear layer.

Every method produces it, every writer and reader converts to and from it, and the runtime's
`QuantLinear` computes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.quantize import packing
from qtool.quantize.grid import Grid, dequantize_codes, grouped
from qtool.quantize.scheme import Scheme


OUTLIER_FIELDS = ("values", "columns", "row_offsets")
DEQUANTIZE_BYTES = 64 << 20  # 64-bit codes unpacked at a time when a weight is dequantized


@dataclass
class SparseOutliers:
    """Weights kept apart from the codes, in CSR form: row r holds `values[row_offsets[r] :
    row_offsets[r + 1]]` at input columns `columns[...]` (ascending). The values are added to the
    dense weight the codes give."""

    values: torch.Tensor  # [nnz], the model dtype
    columns: torch.Tensor  # int32 [nnz]
    row_offsets: torch.Tensor  # int32 [out + 1]

    @classmethod
    def from_dense(cls, values: torch.Tensor, mask: torch.Tensor) -> "SparseOutliers":
        """The entries of `values` [out, in] where `mask` is set, row by row."""
        rows, columns = mask.nonzero(as_tuple=True)  # row-major order
        counts = torch.bincount(rows, minlength=mask.shape[0])
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(values[rows, columns], columns.to(torch.int32), offsets.to(torch.int32))

    def add_to(self, dense: torch.Tensor) -> torch.Tensor:
        """`dense` [out, in] with the outliers added (in place)."""
        rows = torch.repeat_interleave(
            torch.arange(len(self.row_offsets) - 1, device=dense.device), (self.row_offsets[1:] - self.row_offsets[:-1]).long())
        dense.index_put_((rows, self.columns.long()), self.values.to(dense.dtype), accumulate=True)
        return dense

    def to(self, device: torch.device | str) -> "SparseOutliers":
        return SparseOutliers(self.values.to(device), self.columns.to(device), self.row_offsets.to(device))

    def rows(self, start: int, count: int) -> "SparseOutliers":
        first, last = int(self.row_offsets[start]), int(self.row_offsets[start + count])
        return SparseOutliers(self.values[first:last].clone(), self.columns[first:last].clone(),
                              (self.row_offsets[start : start + count + 1] - first).contiguous())


@dataclass
class QuantizedWeight:
    """packed: int32 [out, ceil(in*bits/32)], codes packed along the input dimension (see packing).
    scales: [out, n_groups] in the model dtype (None for LUT weights). zeros: int32 [out, n_groups],
    asymmetric only (symmetric grids have the implied zero 2**(bits-1)). g_idx: int32 [in], the
    group of each input column when groups do not follow column order (act-order); None means
    contiguous groups. shape: the original (out, in). lut: [out, n_groups, 2**bits] in float16,
    the values codes stand for, when `scheme.lut`. outliers: weights stored apart, added to the
    dequantized weight (dense-and-sparse)."""

    packed: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    scheme: Scheme
    shape: tuple[int, int]
    g_idx: torch.Tensor | None = None
    lut: torch.Tensor | None = None
    outliers: SparseOutliers | None = None

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

        return QuantizedWeight(move(self.packed), move(self.scales), move(self.zeros), self.scheme, self.shape,
                               move(self.g_idx), move(self.lut), move(self.outliers))

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Split along the output dimension: layers quantized together (one shared input) come
        apart into their own weights (each with its own copy of g_idx: stores refuse shared memory)."""
        def part(tensor, start, size):
            return None if tensor is None else tensor[start : start + size].contiguous()

        parts, start = [], 0
        for size in sizes:
            parts.append(QuantizedWeight(
                part(self.packed, start, size), part(self.scales, start, size), part(self.zeros, start, size),
                self.scheme, (size, self.in_features), None if self.g_idx is None else self.g_idx.clone(),
                part(self.lut, start, size),
                None if self.outliers is None else self.outliers.rows(start, size),
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
        """The dense weight [out, in] the codes (and outliers) stand for, computed in float32 and
        cast to `dtype`, a slab of rows at a time: unpacking a whole matrix at once takes about
        five times its float32 size in 64-bit work buffers (1.2 GB for an 8B model's down projection)."""
        rows = max(1, DEQUANTIZE_BYTES // (8 * self.in_features))
        if self.out_features <= rows:
            return self._dequantize_rows().to(dtype)
        dense = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
        for start in range(0, self.out_features, rows):
            count = min(rows, self.out_features - start)
            dense[start : start + count] = self._row_slab(start, count)._dequantize_rows()
        return dense

    def _row_slab(self, start: int, count: int) -> "QuantizedWeight":
        """Rows start:start+count, as views where they can be."""
        def part(tensor):
            return None if tensor is None else tensor[start : start + count]

        outliers = None if self.outliers is None else self.outliers.rows(start, count)
        return QuantizedWeight(part(self.packed), part(self.scales), part(self.zeros), self.scheme,
                               (count, self.in_features), self.g_idx, part(self.lut), outliers)

    def _dequantize_rows(self) -> torch.Tensor:
        dense = self._dequantize_codes()
        if self.outliers is not None:
            self.outliers.add_to(dense)
        return dense

    def _dequantize_codes(self) -> torch.Tensor:
        codes = self.codes()
        if self.lut is not None:
            groups = grouped(codes, self.scheme.group_size).long()
            return self.lut.float().gather(2, groups).reshape(codes.shape)
        if self.g_idx is None:
            return dequantize_codes(codes, self.scales, self.zero_points(), self.scheme.group_size)
        index = self.g_idx.long()
        scales = self.scales.float()[:, index]
        zeros = self.zero_points()[:, index]
        return (codes - zeros).float() * scales

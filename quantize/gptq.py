"""GPTQ: quantize a weight column by column, folding each column's rounding error into the columns
not yet quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

A pure function of (weight, Hessian, scheme): the pipeline supplies H = 2/n * sum(X^T X).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch

from qtool.errors import FAILURE, QtoolError
from qtool.host_memory import release_freed_memory
from qtool.quantize.grid import Grid, fit_grid, round_to_grid
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme

log = logging.getLogger(__name__)
ACT_ORDERS = ("none", "static", "group")
DAMP_RETRIES = 6
SPILL_BYTES = 256 << 20  # a Hessian this large is kept on disk while it is factored in place
TRIANGLE_BLOCK = 256
GRAPH_HEADROOM = 32  # free memory a sweep's graph capture asks for, in multiples of its block of columns
SLAB_BYTES = 32 << 20  # float32 weight rows handled at a time where whole-matrix temporaries would add up


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    row_terms: torch.Tensor  # [2, out] float64: ||(W - Q)_r X||^2 and ||W_r X||^2 per row r, through H
    damp: float  # the damping that made H positive definite (raised from the asked one if needed)

    @property
    def error(self) -> float:
        """||WX - QX||^2 / ||WX||^2 on the calibration inputs."""
        return error_ratio(self.row_terms)

    def part_errors(self, sizes: list[int]) -> list[float]:
        """The error of each run of rows (layers solved together), from the same terms."""
        return [error_ratio(terms) for terms in self.row_terms.split(sizes, dim=1)]


def gptq(
    weight: torch.Tensor | Sequence[torch.Tensor],
    hessian: torch.Tensor,
    scheme: Scheme,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: str = "none",
    scale_dtype: torch.dtype | None = None,
    mse: bool = False,
    overwrite_hessian: bool = False,
) -> GPTQResult:
    """Quantize `weight` [out, in] (or the row-wise concatenation of several weights reading one
    input) given the input Hessian [in, in]; scales are stored in `scale_dtype` (default: the
    weight's dtype), and searched for the least rounding error with `mse`. With
    `overwrite_hessian` the Hessian's memory is reused for its factorisation (it is the largest
    tensor of a calibration: 0.8 GB for an 8B model's down projection).

    Grids are fitted as their group is reached, on the weights as updated so far (act-order
    `static`: on the original weights, up front). The block size is adjusted so that groups start
    at block boundaries or at fixed offsets inside blocks, which keeps every full block's sweep the
    same sequence of operations (replayed as a CUDA graph on GPUs).
    """
    if act_order not in ACT_ORDERS:
        raise QtoolError(f"unknown act-order {act_order!r}; choose one of: {', '.join(ACT_ORDERS)}")
    parts = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    scale_dtype = scale_dtype or parts[0].dtype
    out_features, in_features = sum(part.shape[0] for part in parts), parts[0].shape[1]
    device = parts[0].device
    group_size = in_features if scheme.group_size == -1 else scheme.group_size
    block_size = _aligned_block_size(block_size, group_size)
    per_group = Scheme(scheme.bits, -1, scheme.symmetric)

    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    H = hessian.detach().to(work, copy=not overwrite_hessian)
    output_norms = torch.cat([_row_quadratic_forms(part, H) for part in parts])
    release_freed_memory()  # the slabs above, before the solve's own allocations
    diagonal = H.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1
    mean_diagonal = diagonal.mean().item()
    columns = torch.arange(in_features, device=device)
    order = torch.argsort(diagonal, descending=True) if act_order != "none" else columns
    inverse_order = torch.argsort(order)
    W = torch.empty(out_features, in_features, dtype=work, device=device)
    chunks = [chunk for part in parts for chunk in part.detach().split(_slab_rows(in_features))]
    for rows, chunk in zip(W.split([chunk.shape[0] for chunk in chunks]), chunks):
        torch.index_select(chunk.to(work), 1, order, out=rows)
    W[:, dead[order]] = 0
    _permute_symmetric_(H, order.flip(0))
    used_damp = _reversed_inverse_factor_(H, damp, mean_diagonal)
    reversed_factor = H  # K, with U = K reversed in both dimensions (see _reversed_inverse_factor_)

    n_groups = in_features // group_size
    scales = torch.empty(out_features, n_groups, dtype=scale_dtype, device=device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.int32, device=device)
    if act_order == "static":  # groups keep the original column order; fit them all up front
        column_group = order // group_size
        for g in range(n_groups):
            grid = fit_grid(W[:, inverse_order[g * group_size : (g + 1) * group_size]], per_group, scale_dtype, mse)
            scales[:, g], zeros[:, g] = grid.scales[:, 0], grid.zeros[:, 0]
    else:
        column_group = columns // group_size
    fit_inside = group_size if act_order != "static" and group_size < block_size else None
    sweep = _sweep_runner(device, out_features, block_size, fit_inside, per_group, scale_dtype, mse, work)

    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
    losses = torch.zeros(out_features, dtype=torch.float64, device=device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        if act_order != "static" and fit_inside is None and start % group_size == 0:
            grid = fit_grid(W[:, start : start + group_size], per_group, scale_dtype, mse)
            scales[:, start // group_size], zeros[:, start // group_size] = grid.scales[:, 0], grid.zeros[:, 0]
        block_groups = column_group[start:end]
        column_scales, column_zeros = scales[:, block_groups].float(), zeros[:, block_groups]
        factor_rows = _factor_rows(reversed_factor, start, end)
        block_codes, errors, column_scales, column_zeros = sweep(
            W[:, start:end], factor_rows[:, : end - start], column_scales, column_zeros
        )
        codes[:, start:end] = block_codes
        losses += errors.pow(2).sum(dim=1, dtype=torch.float64)
        if fit_inside is not None:
            fitted = slice(start // group_size, end // group_size)
            scales[:, fitted] = column_scales[:, ::group_size].to(scale_dtype)
            zeros[:, fitted] = column_zeros[:, ::group_size]
        W[:, end:].addmm_(errors, factor_rows[:, end - start :], alpha=-1)
    del W, H, reversed_factor, factor_rows, diagonal
    if overwrite_hessian:  # handed over (HessianStat.take): the factor's memory goes back before packing
        del hessian
    release_freed_memory()

    codes = codes[:, inverse_order]
    g_idx = column_group[inverse_order].to(torch.int32) if act_order == "group" else None
    quantized = QuantizedWeight.from_codes(codes, Grid(scales, zeros), scheme, g_idx=g_idx)
    damping = used_damp * mean_diagonal
    ridge, on_dead = _error_corrections(parts, quantized, dead)
    errors = (losses - damping * ridge - on_dead).clamp_(min=0)
    return GPTQResult(quantized, torch.stack([errors, output_norms]), used_damp)


def _row_quadratic_forms(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """[out] float64: w H w^T for every row w of `weight`, in H's dtype, a slab of rows at a time."""
    forms = []
    for chunk in weight.split(_slab_rows(weight.shape[1])):
        chunk = chunk.to(hessian.dtype)
        forms.append((chunk @ hessian * chunk).sum(dim=1, dtype=torch.float64))
    return torch.cat(forms)


def _error_corrections(parts: list[torch.Tensor], quantized: QuantizedWeight,
                       dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, ||D||^2 and ||D on dead columns||^2 for D = W - Q (dead columns of W zeroed).

    The sweep's losses sum to D H' D^T for the H' it factored: H with a unit diagonal on dead
    columns, plus the damping times the identity. Subtracting these two terms leaves D H D^T, the
    error on the calibration inputs, without keeping H (or a copy) until the solve is done."""
    references = [chunk for part in parts for chunk in part.split(_slab_rows(part.shape[1]))]
    sizes = [chunk.shape[0] for chunk in references]
    ridge, on_dead = [], []
    for reference, part in zip(references, quantized.split_rows(sizes)):
        delta = reference.float().masked_fill(dead, 0) - part.dequantize()
        ridge.append(delta.pow(2).sum(dim=1, dtype=torch.float64))
        on_dead.append(delta[:, dead].pow(2).sum(dim=1, dtype=torch.float64))
    return torch.cat(ridge), torch.cat(on_dead)


def _slab_rows(in_features: int) -> int:
    return max(1, SLAB_BYTES // (4 * in_features))


def _permute_symmetric_(matrix: torch.Tensor, order: torch.Tensor, chunk: int = 1024) -> None:
    """matrix <- matrix[order][:, order] in place, a slab of `chunk` rows or columns at a time."""
    for start in range(0, matrix.shape[0], chunk):
        matrix[start : start + chunk] = matrix[start : start + chunk].index_select(1, order)
    for start in range(0, matrix.shape[1], chunk):
        matrix[:, start : start + chunk] = matrix[:, start : start + chunk].index_select(0, order)


def _reversed_inverse_factor_(hessian: torch.Tensor, damp: float, mean_diagonal: float) -> float:
    """In place, for `hessian` given in reversed column order (M = J H J, J the reversal):
    M + damping * I becomes K = L^-1 for its lower Cholesky factor L. Returns the damping factor
    used, grown tenfold until the factorisation succeeds.

    GPTQ needs U, the upper Cholesky factor of H^-1. With M = L L^T, H = (J L J)(J L J)^T where
    J L J is upper triangular, so H^-1 = U^T U for U = (J L J)^-1 = J K J: one Cholesky and one
    triangular inverse, both in the Hessian's own memory, instead of the Cholesky, inverse and
    second Cholesky (and two more [in, in] matrices) of the textbook route."""
    saved = _SavedCopy(hessian)
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    try:
        for attempt in range(DAMP_RETRIES):
            if attempt:
                saved.restore()
            hessian.diagonal().add_(damp * mean_diagonal)
            diagonal = hessian.diagonal().clone()
            _cholesky_lower_(hessian, info)
            if info.item() == 0 and _numerically_definite(hessian.diagonal(), diagonal):
                saved.close()  # before the inverse: on a GPU the copy is a second [in, in] matrix
                _invert_lower_(hessian)
                return damp
            log.warning("Hessian not positive definite at damping %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    finally:
        saved.close()
    raise QtoolError("the Hessian stays singular even with heavy damping; use more calibration samples", FAILURE)


def _cholesky_lower_(matrix: torch.Tensor, info: torch.Tensor) -> None:
    """matrix <- its lower Cholesky factor, in place. LAPACK factors column-major matrices, and
    torch copies a row-major one for it: as much memory again. Above SPILL_BYTES, where memory is
    what runs short, the column-major view of the (symmetric) matrix is factored as upper instead:
    read row-major, its upper factor is the lower one (the same factor, up to rounding)."""
    if matrix.nbytes < SPILL_BYTES:
        torch.linalg.cholesky_ex(matrix, out=(matrix, info))
        return
    column_major = matrix.mT
    torch.linalg.cholesky_ex(column_major, upper=True, out=(column_major, info))


def _numerically_definite(pivots: torch.Tensor, diagonal: torch.Tensor) -> bool:
    """Whether every column of a Cholesky factor kept more of its diagonal entry than rounding
    error: a pivot below that means the matrix is singular in its precision, though LAPACK went on."""
    return bool((pivots.square() >= torch.finfo(pivots.dtype).eps * diagonal).all())


class _SavedCopy:
    """A copy of a matrix that an in-place factorisation overwrites, to retry from. A large matrix
    in host memory goes to a temporary file: host memory is what large models run short of."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix, self.copy, self.file = matrix, None, None
        if matrix.device.type == "cpu" and matrix.nbytes >= SPILL_BYTES:
            self.file = tempfile.TemporaryFile()
            self.file.write(memoryview(matrix.numpy()).cast("B"))
        else:
            self.copy = matrix.clone()

    def restore(self) -> None:
        if self.file is None:
            self.matrix.copy_(self.copy)
            return
        self.file.seek(0)
        self.file.readinto(memoryview(self.matrix.numpy()).cast("B"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.copy = None


def _invert_lower_(lower: torch.Tensor, block: int = TRIANGLE_BLOCK) -> None:
    """lower <- lower^-1 in place, for a lower triangular matrix, a block of rows at a time from the
    top: row block i of the inverse needs only its own rows of `lower` and the inverse's rows above."""
    n = lower.shape[0]
    for top in range(0, n, block):
        bottom = min(top + block, n)
        identity = torch.eye(bottom - top, dtype=lower.dtype, device=lower.device)
        diagonal_inverse = torch.linalg.solve_triangular(lower[top:bottom, top:bottom], identity, upper=False)
        if top:
            products = torch.empty(bottom - top, top, dtype=lower.dtype, device=lower.device)
            for left in range(0, top, block):  # the inverse above is lower triangular: skip its zeros
                right = min(left + block, top)
                torch.mm(lower[top:bottom, left:top], lower[left:top, left:right], out=products[:, left:right])
            lower[top:bottom, :top] = torch.mm(diagonal_inverse, products).neg_()
        lower[top:bottom, top:bottom] = diagonal_inverse


def _factor_rows(reversed_factor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start:end of U from columns start on, U being `reversed_factor` reversed in both dimensions."""
    n = reversed_factor.shape[0]
    return reversed_factor[n - end : n - start, : n - start].flip(0, 1)


def _aligned_block_size(block_size: int, group_size: int) -> int:
    """A block size whose blocks hold whole groups, or that divides the group size."""
    if group_size <= block_size:
        return block_size - block_size % group_size
    while group_size % block_size:
        block_size -= 1
    return block_size


def sweep_block(
    block: torch.Tensor,
    inverse: torch.Tensor,
    column_scales: torch.Tensor,
    column_zeros: torch.Tensor,
    fit_every: int | None,
    grid_scheme: Scheme,
    scale_dtype: torch.dtype,
    mse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a block of columns [out, width] in place of `block`, one column at a time, pushing
    each column's error onto the columns after it through the block's inverse-Hessian factor.

    With `fit_every`, the grid of each run of `fit_every` columns is fitted (into `column_scales`,
    `column_zeros`) when the sweep reaches it. Returns the codes and the scaled errors [out, width].
    A fixed sequence of tensor operations, with no host synchronisation, so it can be captured.
    """
    width = block.shape[1]
    codes = torch.empty(block.shape, dtype=torch.int32, device=block.device)
    errors = torch.empty_like(block)
    for i in range(width):
        if fit_every is not None and i % fit_every == 0:
            grid = fit_grid(block[:, i : i + fit_every], grid_scheme, scale_dtype, mse)
            column_scales[:, i : i + fit_every] = grid.scales.float()
            column_zeros[:, i : i + fit_every] = grid.zeros
        scale, zero = column_scales[:, i], column_zeros[:, i]
        q = round_to_grid(block[:, i], scale, zero, grid_scheme.bits)
        codes[:, i] = q
        error = (block[:, i] - (q - zero) * scale) / inverse[i, i]
        block[:, i:].addr_(error, inverse[i, i:], alpha=-1)
        errors[:, i] = error
    return codes, errors


def _sweep_runner(device, out_features, block_size, fit_every, grid_scheme, scale_dtype, mse, dtype=torch.float32):
    """sweep(block, inverse, column_scales, column_zeros) -> (codes, errors, column_scales,
    column_zeros), for blocks that are views into W. On CUDA a full-width block's sweep is
    captured once as a graph and replayed (the sweep is launch-bound: ~20 small kernels per
    column); elsewhere, and for a shorter last block, it runs as it is."""

    def eager(block, inverse, column_scales, column_zeros):
        block = block.clone()
        codes, errors = sweep_block(block, inverse, column_scales, column_zeros, fit_every, grid_scheme, scale_dtype, mse)
        return codes, errors, column_scales, column_zeros

    if (torch.device(device).type != "cuda" or os.environ.get("QTOOL_CUDA_GRAPHS", "1") == "0"
            or not _room_to_capture(device, out_features * block_size * torch.finfo(dtype).bits // 8)):
        return eager
    static_block = torch.zeros(out_features, block_size, dtype=dtype, device=device)
    static_inverse = torch.eye(block_size, dtype=dtype, device=device)
    static_scales = torch.ones(out_features, block_size, device=device)
    static_zeros = torch.zeros(out_features, block_size, dtype=torch.int32, device=device)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the main stream, as capture requires
        sweep_block(static_block.clone(), static_inverse, static_scales.clone(), static_zeros.clone(),
                    fit_every, grid_scheme, scale_dtype, mse)
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.cuda.graph(graph):
        static_codes, static_errors = sweep_block(
            static_block, static_inverse, static_scales, static_zeros, fit_every, grid_scheme, scale_dtype, mse
        )

    def replay(block, inverse, column_scales, column_zeros):
        if block.shape[1] != block_size:
            return eager(block, inverse, column_scales, column_zeros)
        static_block.copy_(block)
        static_inverse.copy_(inverse)
        static_scales.copy_(column_scales)
        static_zeros.copy_(column_zeros)
        graph.replay()
        return static_codes, static_errors, static_scales, static_zeros

    return replay


def error_ratio(terms: torch.Tensor) -> float:
    numerator, denominator = terms.sum(dim=1).tolist()
    return numerator / max(denominator, 1e-30)


def _room_to_capture(device, block_bytes: int) -> bool:
    """Whether a sweep's graph can be captured without running out of memory: a capture that
    fails takes the process down with it (torch 2.11 aborts destroying such a graph), so near
    the device's or the --max-device-memory limit the sweep runs eagerly instead."""
    device = torch.device(device)
    free, total = torch.cuda.mem_get_info(device)
    capped = torch.cuda.get_per_process_memory_fraction(device) * total - torch.cuda.memory_reserved(device)
    return min(free, capped) >= GRAPH_HEADROOM * block_bytes


def output_error(weight: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor) -> float:
    """||WX - QX||^2 / ||WX||^2 for the inputs X whose Hessian is H (proportional to X^T X)."""
    reference = weight.float()
    delta = reference - quantized.dequantize()
    hessian = hessian.float()
    return error_ratio(torch.stack([_row_quadratic_forms(delta, hessian), _row_quadratic_forms(reference, hessian)]))

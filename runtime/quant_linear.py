"""`QuantLinear`: a linear layer that keeps its weight quantized and computes with it.

On CUDA it runs qtool's Triton kernel (`qtool.kernels.quant_matmul`) where the weight suits it:
4- and 8-bit uniform grids, and look-up tables of up to 16 entries. The first CUDA forward builds
the kernel's view of the weight once, K-major (codes, scales, zeros and tables transposed, so a
tile is read along the output dimension): a second copy of the weight's tensors, as large as the
first; for 3-bit (and 2-bit) tables with the codes in 4-bit slots (4/3 of their packed size);
for act-order weights whose groups do not follow column order (`g_idx`), with the columns sorted
by group, the activations being permuted the same way at each call. Elsewhere, and for what the
kernel does not hold, the reference path dequantizes the weight to the activation dtype and
calls `F.linear`. W8A8 weights (8-bit activations) quantize each token's activations to int8 and
multiply integers (`qtool.kernels.int8_matmul`: Triton and cuBLAS int8 kernels on CUDA, the
reference elsewhere); the first forward on a device makes the codes' int8 copy there once
(N * K bytes, as large as the packed codes, plus the scales in float32), one for each group of
linears that read one input (`FusedLinears`, `Int8Layout`).

On Hopper, 4-bit uniform grids that `w4_fragments` fits (fp16 scales and activations, groups of 64
or more, N and K multiples of 16) keep their codes a third time, laid out as the wgmma's register
fragments for products of 3 or more tokens (`with_fragments`: N * K / 2 bytes, 3.5 GB for Llama-3-8B).
The runtime makes all of these before it sizes its KV cache (`make_kernel_views`).

Products of up to 64 tokens may be left pending for the kernel that reads them
(`pending_product`, `qtool.kernels.pending`): each kernel view then keeps a float32 accumulator of
64 x its outputs (for Llama-3-8B, 11 MB a layer, 352 MB in all), made at the first such product,
or by the runtime before it sizes its KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qtool.kernels import int8_matmul
from qtool.kernels.pending import PendingSum
from qtool.kernels.quant_matmul import (PENDING_TOKENS, KERNEL_BITS, KernelWeight, kernel_fits, pends, quant_matmul,
                                        with_fragments)
from qtool.quantize import packing
from qtool.quantize.qweight import OUTLIER_FIELDS, QuantizedWeight, SparseOutliers
from qtool.quantize.scheme import Scheme

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.scheme: Scheme = weight.scheme
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("g_idx", weight.g_idx)
        self.register_buffer("lut", weight.lut)
        outliers = weight.outliers
        for field in OUTLIER_FIELDS:
            self.register_buffer(f"outlier_{field}", None if outliers is None else getattr(outliers, field))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._kernel: tuple[torch.device, KernelLayout | None] | None = None
        self._int8: tuple[torch.device, int8_matmul.Int8Weight] | None = None

    def quantized_weight(self) -> QuantizedWeight:
        outliers = None
        if self.outlier_values is not None:
            outliers = SparseOutliers(*(getattr(self, f"outlier_{field}") for field in OUTLIER_FIELDS))
        return QuantizedWeight(self.packed, self.scales, self.zeros, self.scheme, (self.out_features, self.in_features),
                               self.g_idx, self.lut, outliers)

    def forward(self, x: torch.Tensor, pending: bool = False) -> torch.Tensor | PendingSum:
        """x @ W^T (+ bias); `pending`: the kernel's product may be left for the kernel that reads it
        next (`pending_product`)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.scheme.activation_bits:
            return int8_matmul.int8_matmul(x, *self._int8_weight(x.device), bias)
        layout = self._running_layout(x)
        if layout is None:
            return F.linear(x, self.quantized_weight().dequantize(x.dtype), bias)
        return layout.multiply(x, bias, pending)

    def _running_layout(self, x: torch.Tensor) -> KernelLayout | None:
        """The kernel view that x's product runs on (made at the first call on x's device); None: the
        reference path."""
        layout = self._kernel_layout(x.device, x.dtype) if x.is_cuda else None
        return layout if layout is not None and layout.fits(x) else None

    def _int8_weight(self, device: torch.device) -> int8_matmul.Int8Weight:
        """`int8_weight` of this W8A8 linear, made once per device."""
        if self._int8 is None or self._int8[0] != device:
            self._int8 = (device, int8_weight(self.quantized_weight(), device))
        return self._int8[1]

    def _kernel_layout(self, device: torch.device, dtype: torch.dtype) -> KernelLayout | None:
        """`kernel_layout` on `device`, made once, for the activations' `dtype` of the first call there: a
        model runs in one dtype, and calls in another take the same view (any fp16-only copy in it unused,
        or absent)."""
        if self._kernel is None or self._kernel[0] != device:
            self._kernel = (device, kernel_layout(self.quantized_weight(), dtype))
        return self._kernel[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"


def pending_product(linear: nn.Module, x: torch.Tensor) -> torch.Tensor | PendingSum:
    """linear(x), or for a QuantLinear that qtool's kernel runs at this few tokens, its product left
    pending (`qtool.kernels.pending`): the next kernel that reads it finishes it, and must, before
    the linear's next call."""
    return linear(x, pending=True) if isinstance(linear, QuantLinear) else linear(x)


@dataclass
class KernelLayout:
    """The kernel's view of a weight, the column order its activations must be given in, and the
    float32 accumulator its pending products are added into (`pends` tokens' worth, made at the
    first, kept zero by their readers, never reallocated: CUDA graphs hold its address)."""

    weight: KernelWeight
    columns: torch.Tensor | None = None
    accumulator: torch.Tensor | None = field(default=None, repr=False)

    def multiply(self, x: torch.Tensor, bias: torch.Tensor | None = None, pending: bool = False
                 ) -> torch.Tensor | PendingSum:
        """x @ W^T (+ bias) through the kernel, x's columns put in the view's order first; `pending`
        and no bias: left pending where the kernel can."""
        if self.columns is not None:
            x = x.index_select(-1, self.columns)
        sums = self._accumulator(x.device) if pending and bias is None and pends(x.numel() // x.shape[-1]) else None
        out = quant_matmul(x, self.weight, sums)
        return out if bias is None else out + bias

    def fits(self, x: torch.Tensor) -> bool:
        """Whether the kernel runs x's product (else the reference path does)."""
        return kernel_fits(x, self.weight)

    def _accumulator(self, device: torch.device) -> torch.Tensor:
        if self.accumulator is None or self.accumulator.device != device:
            self.accumulator = torch.zeros(PENDING_TOKENS * self.weight.out_features, device=device,
                                           dtype=torch.float32)
        return self.accumulator


@dataclass
class Int8Layout:
    """W8A8 linears that read one input, joined along the outputs: the activations are quantized
    once a call where each linear would quantize them again, and one int8 product runs where there
    were several. The same outputs: each column's integer sums and epilogue are the linear's own."""

    weight: int8_matmul.Int8Weight

    @staticmethod
    def joined(weights: list[QuantizedWeight], device: torch.device) -> "Int8Layout | None":
        """None where the joined codes would be too large for the kernels' 32-bit offsets."""
        if sum(weight.out_features for weight in weights) * weights[0].in_features >= 2**31:
            return None
        parts = [int8_weight(weight, device) for weight in weights]
        return Int8Layout(int8_matmul.Int8Weight(torch.cat([part.codes for part in parts]),
                                                 torch.cat([part.scales for part in parts])))

    def fits(self, x: torch.Tensor) -> bool:
        """Always: `int8_matmul` runs the reference itself where its kernels do not take x, with each
        column's result the linear's own, so the linears need no int8 copies of their own."""
        return True

    def multiply(self, x: torch.Tensor, bias: torch.Tensor | None = None, pending: bool = False) -> torch.Tensor:
        """x @ W^T (+ bias); never left pending (no reader finishes an int8 product)."""
        return int8_matmul.int8_matmul(x, *self.weight, bias)


def int8_weight(weight: QuantizedWeight, device: torch.device) -> int8_matmul.Int8Weight:
    """A W8A8 weight as `int8_matmul` takes it: the codes as signed int8 [out, in] (unsigned codes
    less their fixed zero of 128) and the per-channel scales in float32, on `device`."""
    codes = (weight.codes() - 128).to(device=device, dtype=torch.int8)
    return int8_matmul.Int8Weight(codes, weight.scales[:, 0].to(device, torch.float32))


def kernel_layout(weight: QuantizedWeight, dtype: torch.dtype) -> KernelLayout | None:
    """The weight as the kernel reads it, or None when the kernel does not hold it; on Hopper with
    its codes also as wgmma fragments where that kernel takes it and activations of `dtype`
    (`with_fragments`)."""
    layout = _plain_layout(weight)
    return None if layout is None else KernelLayout(with_fragments(layout.weight, dtype), layout.columns)


def _plain_layout(weight: QuantizedWeight) -> KernelLayout | None:
    scheme = weight.scheme
    if scheme.lut and scheme.bits > 4 or not scheme.lut and scheme.bits not in KERNEL_BITS:
        return None
    packed, bits, columns = weight.packed, scheme.bits, None
    if weight.g_idx is not None:
        columns = torch.argsort(weight.g_idx, stable=True)
        if not torch.equal(weight.g_idx[columns].long(), torch.arange(weight.in_features, device=columns.device)
                           // scheme.group_size):
            return None  # groups of unequal sizes
        packed = packing.pack(weight.codes()[:, columns], bits)
        log.debug("act-order weight %s: codes re-sorted by group for the kernel (+%d bytes)", weight.shape,
                  packed.numel() * 4)
    if scheme.lut and bits < 4:
        packed, bits = packing.pack(weight.codes(), 4), 4
        log.debug("%d-bit table codes widened to 4 bits for the kernel (+%d bytes)", scheme.bits, packed.numel() * 4)
    outliers = weight.outliers
    parts = {} if outliers is None else {f"outlier_{field}": getattr(outliers, field) for field in OUTLIER_FIELDS}
    return KernelLayout(KernelWeight.from_rows(packed, bits, weight.in_features, scheme.group_size,
                                               scales=weight.scales, zeros=weight.zeros, lut=weight.lut, **parts),
                        columns)


def fused_kernel_layout(weights: list[QuantizedWeight], dtype: torch.dtype) -> KernelLayout | None:
    """One kernel view of weights that read the same input, joined along the outputs (columns of
    the view); None unless all are uniform grids of one kind (bits, group, zero points), without
    tables or outliers, with one column order."""
    layouts = [_plain_layout(weight) for weight in weights]
    if any(layout is None for layout in layouts):
        return None
    first, kernels = layouts[0], [layout.weight for layout in layouts]
    head = kernels[0]
    if not all(_same_order(layout.columns, first.columns) for layout in layouts):
        return None
    if any(kernel.lut is not None or kernel.outlier_values is not None or kernel.bits != head.bits
           or kernel.group_size != head.group_size or kernel.in_features != head.in_features
           or (kernel.zeros is None) != (head.zeros is None) for kernel in kernels):
        return None

    def joined(field):
        parts = [getattr(kernel, field) for kernel in kernels]
        return None if parts[0] is None else torch.cat(parts, dim=1)

    joined_weight = KernelWeight(joined("packed"), head.bits, head.in_features, head.group_size,
                                 scales=joined("scales"), zeros=joined("zeros"))
    return KernelLayout(with_fragments(joined_weight, dtype), first.columns)


def _same_order(columns: torch.Tensor | None, others: torch.Tensor | None) -> bool:
    """Whether two views take their activations in one column order (None: as they come)."""
    if columns is None or others is None:
        return columns is others
    return torch.equal(columns, others)


class FusedLinears:
    """Linears of one module that read the same input (q/k/v, gate/up), run as one quantized
    product on CUDA: their kernel views joined along the outputs once, at the first CUDA call
    (as large as their separate views would be), then one launch where there were several; W8A8
    linears joined as one int8 weight (`Int8Layout`: one activation quantization, one product).
    Where that cannot be (dense layers, weights of different kinds, no GPU), each linear runs
    alone. Looks its linears up by name at each call: the loader replaces them after the model
    is built."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...]):
        self.owner, self.names = owner, names
        self._fused: tuple[torch.device, tuple | None] | None = None

    def __call__(self, x: torch.Tensor, pending: bool = False) -> list[torch.Tensor | PendingSum]:
        """The linears' outputs; `pending`: their products may be left for the kernel that reads them
        (`pending_product`)."""
        fused = self._running(x)
        if fused is None:
            return [pending_product(linear, x) if pending else linear(x) for linear in self._linears()]
        layout, sizes, bias = fused
        out = layout.multiply(x, None if bias is None else bias.to(x.dtype), pending)
        return list(out.split(sizes, dim=-1))

    def _linears(self) -> list[nn.Module]:
        return [getattr(self.owner, name) for name in self.names]

    def _running(self, x: torch.Tensor) -> tuple | None:
        """The joined view (with its sizes and bias) that x's product runs on, made at the first call
        on x's device; None: each linear runs alone."""
        fused = self._fused_on(x.device, x.dtype, self._linears()) if x.is_cuda else None
        return fused if fused is not None and fused[0].fits(x) else None

    def _fused_on(self, device: torch.device, dtype: torch.dtype, linears: list[nn.Module]) -> tuple | None:
        if self._fused is None or self._fused[0] != device:  # once, as `QuantLinear._kernel_layout`
            fused = None
            layout = None
            if all(isinstance(linear, QuantLinear) and not any(buffer.is_meta for buffer in linear.buffers())
                   for linear in linears):
                weights = [linear.quantized_weight() for linear in linears]
                w8a8 = [bool(linear.scheme.activation_bits) for linear in linears]
                if all(w8a8):
                    layout = Int8Layout.joined(weights, device)
                elif not any(w8a8):
                    layout = fused_kernel_layout(weights, dtype)
            if layout is not None:
                biases = [linear.bias for linear in linears]
                present = next((b for b in biases if b is not None), None)
                bias = None if present is None else torch.cat([
                    present.new_zeros(linear.out_features) if b is None else b
                    for b, linear in zip(biases, linears)])
                fused = (layout, [linear.out_features for linear in linears], bias)
            self._fused = (device, fused)
        return self._fused[1]


def make_kernel_views(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Makes what the model's first forwards on `device` with `dtype` activations would make: every
    kernel view (the fused groups' joined views where the kernel runs them, the other linears' own),
    the pending products' accumulators of the views the kernel runs, and the W8A8 linears' int8
    copies (joined for the groups), so that memory measured afterwards (the runtime's KV-cache
    budget) counts them. It asks what the forward asks (`_running`, `_running_layout`) of
    activations like theirs."""
    probe = torch.empty(0, device=device, dtype=dtype)
    fused, layouts = set(), []
    for module in model.modules():
        for group in list(vars(module).values()):
            if isinstance(group, FusedLinears) and (running := group._running(probe)) is not None:
                fused.update(map(id, group._linears()))
                layouts.append(running[0])
    for module in model.modules():
        if isinstance(module, QuantLinear) and id(module) not in fused:
            if module.scheme.activation_bits:
                module._int8_weight(device)
            elif (layout := module._running_layout(probe)) is not None:
                layouts.append(layout)
    for layout in layouts:
        if isinstance(layout, KernelLayout):
            layout._accumulator(device)

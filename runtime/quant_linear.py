"""`QuantLinear`: a linear layer that keeps its weight quantized and computes with it.

The reference path dequantizes the weight to the activation dtype and calls `F.linear`; it runs
anywhere. Kernels for CUDA plug in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtool.quantize.qweight import OUTLIER_FIELDS, QuantizedWeight, SparseOutliers
from qtool.quantize.scheme import Scheme


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

    def quantized_weight(self) -> QuantizedWeight:
        outliers = None
        if self.outlier_values is not None:
            outliers = SparseOutliers(*(getattr(self, f"outlier_{field}") for field in OUTLIER_FIELDS))
        return QuantizedWeight(self.packed, self.scales, self.zeros, self.scheme, (self.out_features, self.in_features),
                               self.g_idx, self.lut, outliers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"

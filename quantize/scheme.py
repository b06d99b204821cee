"""Quantization settings as frozen, validated values: `Scheme` for one layer, `Recipe` for a model."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from qtool.errors import QtoolError

@dataclass(frozen=True)
class Scheme:
    """How one linear layer's weight is quantized.

    bits: 2-8. group_size: input columns sharing one scale (and zero), -1 for one per output
    channel. symmetric: zero fixed at 2**(bits-1), so no zero point is stored. lut: codes index
    a look-up table of 2**bits values per row and group (non-uniform, SqueezeLLM) instead of a
    uniform grid; `symmetric` means nothing then.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    lut: bool = False
    activation_bits: int | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QtoolError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and self.group_size < 1
        ):
            raise QtoolError(f"group size must be -1 (per channel) or a positive integer, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise QtoolError(f"symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.lut, bool):
            raise QtoolError(f"lut must be true or false, got {self.lut!r}")
        if self.activation_bits is not None and (self.activation_bits != 8 or isinstance(self.activation_bits, bool)):
            raise QtoolError(f"activation bits must be 8 (int8 per token) or left out, got {self.activation_bits!r}")
        if self.activation_bits is not None and (self.bits, self.group_size, self.symmetric, self.lut) != (8, -1, True, False):
            raise QtoolError("8-bit activations (W8A8) go with 8-bit symmetric per-channel weights: "
                             "--bits 8 --group-size -1 --sym")

    def group_count(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        activations = f"A{self.activation_bits}" if self.activation_bits else ""
        return f"W{self.bits}{activations} {group} {'lut' if self.lut else 'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class Override:
    """Layers whose name matches `pattern` (re.search) get `scheme`, or stay unquantized when it is None."""

    pattern: str
    scheme: Scheme | None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise QtoolError(f"layer pattern {self.pattern!r} is not a valid regular expression: {error}") from None

    def matches(self, layer_name: str) -> bool:
        return re.search(self.pattern, layer_name) is not None


@dataclass(frozen=True)
class CalibrationSpec:
    """Which text calibrates the model: a named source or a file, `nsamples` windows of `seqlen` tokens."""

    source: str = "wiki-leads"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self):
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QtoolError(f"calibration {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's solver settings: columns per lazy update block, damping as a fraction of the mean
    Hessian diagonal, activation order (none | static | group; static, the default, solves columns
    in decreasing Hessian-diagonal order but keeps groups contiguous), and whether each group of linears
    sharing an input is calibrated after the groups before it in the block are quantized."""

    block_size: int = 128
    damp: float = 0.01
    act_order: str = "static"
    true_sequential: bool = True

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise QtoolError(f"GPTQ block size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 < self.damp < 1:
            raise QtoolError(f"GPTQ damping must be a number between 0 and 1, got {self.damp!r}")
        if self.act_order not in ("none", "static", "group"):
            raise QtoolError(f"unknown act-order {self.act_order!r}; choose one of: none, static, group")


@dataclass(frozen=True)
class AWQOptions:
    """AWQ's searches: per-channel scales s = mean|x|^a (divided by the weights' mean relative
    magnitude^(1-a) with `duo_scaling`) for a on a grid of `grid` points in [0, 1); then, unless
    `clip` is off, each group's clipping range shrunk down to `max_shrink` of its max |w| over
    `grid` steps, for the layers not matching `clip_skip` (AWQ leaves q and k unclipped)."""

    duo_scaling: bool = True
    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    clip_skip: str = r"(^|\.)(q_proj|k_proj|query|key|qkv_proj|Wqkv|c_attn)$"

    def __post_init__(self):
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 2:
            raise QtoolError(f"AWQ grid must be an integer of at least 2, got {self.grid!r}")
        if not isinstance(self.max_shrink, (int, float)) or not 0 < self.max_shrink < 1:
            raise QtoolError(f"AWQ max shrink must be a number between 0 and 1, got {self.max_shrink!r}")
        try:
            re.compile(self.clip_skip)
        except re.error as error:
            raise QtoolError(f"AWQ clip-skip pattern {self.clip_skip!r} is not a regular expression: {error}") from None


@dataclass(frozen=True)
class SqueezeLLMOptions:
    """SqueezeLLM's settings: the fraction of each layer's weights kept exactly as sparse outliers
    (0 for dense-only; the paper's sparse variant keeps 0.45%), of which `sensitive_fraction`
    (of all weights) are chosen by Fisher information and the rest by magnitude; whether the
    k-means is weighted by the Fisher information (`fisher`; off only to measure what it buys);
    and the cap on Lloyd iterations."""

    outliers: float = 0.0
    sensitive_fraction: float = 0.0005
    fisher: bool = True
    max_iterations: int = 100

    def __post_init__(self):
        for name in ("outliers", "sensitive_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 0.5:
                raise QtoolError(f"SqueezeLLM {name.replace('_', ' ')} must be a fraction from 0 to 0.5 "
                                 f"(e.g. 0.0045 or 0.45%), got {value!r}")
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise QtoolError(f"SqueezeLLM max iterations must be a positive integer, got {self.max_iterations!r}")


@dataclass(frozen=True)
class SmoothQuantOptions:
    """SmoothQuant's migration strength: how much of the activations' range moves into the weights
    (0: none, 1: all), or "auto": searched for each group of linears on the calibration data."""

    alpha: float | str = 0.8

    def __post_init__(self):
        if self.alpha == "auto":
            return
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise QtoolError(f"SmoothQuant alpha must be a number from 0 to 1 or auto, got {self.alpha!r}")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a quantized checkpoint: method, default scheme, per-layer overrides,
    calibration data and output format. The first matching override wins. Method and format names
    are checked against their registries where they are used. `mse`: grids are searched for the
    least rounding error instead of spanning each group's min-max range."""

    method: str = "rtn"
    scheme: Scheme = field(default_factory=Scheme)
    overrides: tuple[Override, ...] = ()
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    format: str = "compressed-tensors"
    kv_cache_dtype: str = "auto"  # fp8: the checkpoint carries per-head KV-cache scales (qtool.calibrate.kv_scales)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    mse: bool = False
    awq: AWQOptions = field(default_factory=AWQOptions)
    squeezellm: SqueezeLLMOptions = field(default_factory=SqueezeLLMOptions)
    smoothquant: SmoothQuantOptions = field(default_factory=SmoothQuantOptions)

    def schemes(self) -> list[Scheme]:
        """Every scheme the recipe can give a layer: the default's and the overrides'."""
        return [self.scheme, *(override.scheme for override in self.overrides if override.scheme is not None)]

    def scheme_for(self, layer_name: str) -> Scheme | None:
        for override in self.overrides:
            if override.matches(layer_name):
                return override.scheme
        return self.scheme

    def to_dict(self) -> dict:
        """The recipe in the shape of a recipe file (`qtool.quantize.recipe_file`)."""
        def options(value) -> dict:
            return {f.name: getattr(value, f.name) for f in fields(value)}

        return {
            "method": self.method,
            "scheme": options(self.scheme),
            "overrides": [{"match": o.pattern, **({"skip": True} if o.scheme is None else {"scheme": options(o.scheme)})}
                          for o in self.overrides],
            "calibration": options(self.calibration),
            "output": {"format": self.format, "kv_cache_dtype": self.kv_cache_dtype},
            "mse": self.mse,
            "gptq": options(self.gptq),
            "awq": options(self.awq),
            "squeezellm": options(self.squeezellm),
            "smoothquant": options(self.smoothquant),
        }

"""Recipes as data: a YAML file (or the command line's flags) describing one `Recipe` and its
quality gates, checked strictly, every error naming the file, line and key.

    method: awq                      # rtn | gptq | awq | awq+gptq | squeezellm | smoothquant | smoothquant+gptq
    scheme: {bits: 4, group_size: 64, symmetric: false}
    overrides:                       # first match wins
      - {match: "mlp\\.down_proj", scheme: {bits: 8, group_size: -1, symmetric: true}}
      - {match: "layers\\.0\\.", skip: true}
    calibration: {source: wiki-leads, nsamples: 128, seqlen: 512, seed: 0}
    output: {format: compressed-tensors, kv_cache_dtype: auto}   # fp8: per-head KV-cache scales too
    mse: false
    gptq: {block_size: 128, damp: 0.01, act_order: static, true_sequential: true}
    awq: {duo_scaling: true, grid: 20, clip: true, max_shrink: 0.5}
    squeezellm: {outliers: 0.0045, sensitive_fraction: 0.0005, fisher: true, max_iterations: 100}
    smoothquant: {alpha: 0.8}             # or auto: searched per group of linears
    gates: {max_ppl_increase_pct: 15, dataset: wikitext, seqlen: 2048, max_windows: 8}

Every section and key is optional; what is left out takes the method's defaults (SqueezeLLM: one
table per row, 100 windows, the qtool format), then qtool's. `Recipe.to_dict()` writes this same
shape, so a checkpoint's qtool.json recipe is itself a valid recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qtool.calibrate.kv_scales import KV_CACHE_DTYPES
from qtool.errors import QtoolError
from qtool.quantize.scheme import (
    AWQOptions, CalibrationSpec, GPTQOptions, Override, Recipe, Scheme, SmoothQuantOptions, SqueezeLLMOptions,
)

SECTIONS = {"scheme": Scheme, "calibration": CalibrationSpec, "gptq": GPTQOptions, "awq": AWQOptions,
            "squeezellm": SqueezeLLMOptions, "smoothquant": SmoothQuantOptions}
TOP_LEVEL = ("method", "scheme", "overrides", "calibration", "output", "mse", "gptq", "awq", "squeezellm", "smoothquant",
             "gates")


@dataclass(frozen=True)
class Gates:
    """What a quantized model must reach: perplexity at most `max_ppl_increase_pct` percent above the
    original's (and at most `max_ppl`, if given) on `max_windows` windows of `seqlen` tokens of `dataset`."""

    max_ppl_increase_pct: float
    max_ppl: float | None = None
    dataset: str = "wikitext"
    seqlen: int = 2048
    max_windows: int = 8

    def __post_init__(self):
        if self.max_ppl_increase_pct <= 0 or (self.max_ppl is not None and self.max_ppl <= 0):
            raise QtoolError("gate limits must be positive")
        if self.seqlen < 2 or self.max_windows < 1:
            raise QtoolError("gate seqlen must be at least 2 and max_windows at least 1")


@dataclass
class RecipeFile:
    """A checked recipe, its gates, and where each key came from (for later errors)."""

    recipe: Recipe
    gates: Gates | None
    source: str = "the command line"
    lines: dict[tuple, int] = field(default_factory=dict)

    def where(self, *path) -> str:
        line = self.lines.get(tuple(path))
        return f"{self.source}:{line}" if line else self.source


def load_recipe(path: Path, overrides: dict | None = None) -> RecipeFile:
    """The recipe in a YAML file, with `overrides` (data of the same shape, e.g. from flags) over it."""
    data, lines = read_yaml(path)
    return build(merge(data, overrides or {}), str(path), lines)


def read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """The file's mapping and the line of every key path."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise QtoolError(f"cannot read the recipe {path}: {error}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise QtoolError(f"{path}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise QtoolError(f"{path}:{node.start_mark.line + 1}: a recipe is a mapping of keys (method, scheme, ...)")
    lines: dict[tuple, int] = {}
    return _value(node, (), lines, yaml), lines


def _value(node, path: tuple, lines: dict, yaml):
    lines.setdefault(path, node.start_mark.line + 1)  # a key's own line, where it has one
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in out:
                raise QtoolError(f"line {key_node.start_mark.line + 1}: {'.'.join(map(str, path + (key,)))} appears twice")
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _value(value_node, path + (key,), lines, yaml)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_value(item, path + (index,), lines, yaml) for index, item in enumerate(node.value)]
    return yaml.SafeLoader("").construct_object(node)  # a scalar, typed as YAML types it


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (lists replaced whole)."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build(data: dict, source: str = "the command line", lines: dict | None = None) -> RecipeFile:
    """The `Recipe` (and gates) `data` describes, with the method's defaults for what it leaves out."""
    from qtool.quantize.format import FORMATS
    from qtool.quantize.methods import METHODS

    lines = lines or {}

    def fail(path: tuple, message: str) -> QtoolError:
        line = lines.get(path)
        where = f"{source}:{line}" if line else source
        return QtoolError(f"{where}: {'.'.join(map(str, path))}: {message}" if path else f"{where}: {message}")

    if not isinstance(data, dict):
        raise fail((), "a recipe is a mapping of keys (method, scheme, ...)")
    _known(data, TOP_LEVEL, (), fail)
    method_name = data.get("method", "rtn")
    if not isinstance(method_name, str) or method_name not in METHODS:
        raise fail(("method",), f"unknown method {method_name!r}; choose one of: {', '.join(METHODS)}")
    method = METHODS.get(method_name)
    data = merge(method.defaults, data)
    sections = {}
    for name, kind in SECTIONS.items():
        values = _section(data, name, kind, fail)
        if kind is Scheme:
            values.setdefault("lut", method.lut)
        sections[name] = _construct(kind, values, (name,), fail)
    overrides = tuple(_override(item, index, method.lut, fail) for index, item in enumerate(_list(data, "overrides", fail)))
    output = data.get("output", {})
    if not isinstance(output, dict):
        raise fail(("output",), f"must be a mapping, got {type(output).__name__}")
    _known(output, ("format", "kv_cache_dtype"), ("output",), fail)
    format_name = output.get("format", "compressed-tensors")
    if not isinstance(format_name, str) or format_name not in FORMATS:
        raise fail(("output", "format"), f"unknown format {format_name!r}; choose one of: {', '.join(FORMATS)}")
    kv_dtype = output.get("kv_cache_dtype", "auto")
    if kv_dtype not in KV_CACHE_DTYPES:
        raise fail(("output", "kv_cache_dtype"), f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_dtype!r}")
    if kv_dtype != "auto" and not FORMATS.get(format_name).kv_scales:
        raise fail(("output", "kv_cache_dtype"), f"--format {format_name} has no place for KV-cache scales; "
                                                 f"use --format compressed-tensors or qtool")
    mse = data.get("mse", False)
    if not isinstance(mse, bool):
        raise fail(("mse",), f"must be true or false, got {mse!r}")
    recipe = Recipe(method=method_name, scheme=sections["scheme"], overrides=overrides,
                    calibration=sections["calibration"], format=format_name, kv_cache_dtype=kv_dtype, gptq=sections["gptq"], mse=mse,
                    awq=sections["awq"], squeezellm=sections["squeezellm"], smoothquant=sections["smoothquant"])
    fmt = FORMATS.get(format_name)
    if fmt.check is not None:
        try:
            fmt.check(recipe)
        except QtoolError as error:
            raise fail(("output", "format"), str(error)) from None
    gates = None
    if "gates" in data:
        gates = _construct(Gates, _section(data, "gates", Gates, fail), ("gates",), fail)
    return RecipeFile(recipe, gates, source, lines)


def _known(mapping: dict, allowed: tuple, path: tuple, fail) -> None:
    for key in mapping:
        if key not in allowed:
            raise fail(path + (key,), f"unknown key {key!r}; known here: {', '.join(allowed)}")


def _list(data: dict, name: str, fail) -> list:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise fail((name,), f"must be a list, got {type(value).__name__}")
    return value


def _section(data: dict, name: str, kind, fail) -> dict:
    values = data.get(name, {})
    if not isinstance(values, dict):
        raise fail((name,), f"must be a mapping, got {type(values).__name__}")
    _known(values, tuple(f.name for f in dataclasses.fields(kind)), (name,), fail)
    return dict(values)


def _construct(kind, values: dict, path: tuple, fail):
    """`kind(**values)` with each value's type checked first (an int is not a bool, a float takes an int)."""
    hints = typing.get_type_hints(kind)
    for key, value in values.items():
        values[key] = _typed(value, hints[key], path + (key,), fail)
    try:
        return kind(**values)
    except QtoolError as error:
        raise fail(path, str(error)) from None
    except TypeError as error:
        raise fail(path, f"missing or misplaced keys ({error})") from None


def _typed(value, hint, path: tuple, fail):
    optional = type(None) in typing.get_args(hint)
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    if value is None and optional:
        return None
    for kind in kinds:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) == (kind is bool) and isinstance(value, kind):
            return value
    names = " or ".join(f"{'an' if kind is int else 'a'} {kind.__name__}" for kind in kinds)
    raise fail(path, f"must be {names}, got {value!r}")


def _override(item, index: int, lut: bool, fail) -> Override:
    path = ("overrides", index)
    if not isinstance(item, dict):
        raise fail(path, "each override is a mapping {match: REGEX, scheme: {...}} or {match: REGEX, skip: true}")
    _known(item, ("match", "scheme", "skip"), path, fail)
    pattern = item.get("match")
    if not isinstance(pattern, str) or not pattern:
        raise fail(path + ("match",), "needs a regular expression")
    if item.get("skip") is True and "scheme" not in item:
        scheme = None
    elif "skip" in item:
        raise fail(path + ("skip",), "an override either skips (skip: true) or gives a scheme, not both")
    elif "scheme" in item:
        values = _section(item, "scheme", Scheme, lambda p, m: fail(path + p, m))
        values.setdefault("lut", lut)
        scheme = _construct(Scheme, values, path + ("scheme",), fail)
    else:
        raise fail(path, "an override needs a scheme or skip: true")
    try:
        return Override(pattern, scheme)
    except QtoolError as error:
        raise fail(path + ("match",), str(error)) from None


def check_matches(recipe_file: RecipeFile, layer_names: list[str]) -> None:
    """Refuse an override whose regex matches none of the model's linear layers (a typo would
    otherwise quietly quantize what it meant to protect)."""
    for index, override in enumerate(recipe_file.recipe.overrides):
        if not any(override.matches(name) for name in layer_names):
            raise QtoolError(f"{recipe_file.where('overrides', index, 'match')}: overrides.{index}.match: "
                             f"{override.pattern!r} matches no linear layer of the model (e.g. {layer_names[0]})")

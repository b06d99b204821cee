"""What a model folder holds, from file headers alone: per-layer schemes, sizes and bits per weight."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtool.quantize.format import format_for
from qtool.quantize.format.checkpoint import model_config, tensor_infos
from qtool.quantize.scheme import Scheme


@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, int]
    scheme: str
    bytes: int
    act_order: bool = False
    spec: Scheme | None = field(default=None, repr=False)  # the scheme itself (`scheme` describes it)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / (self.shape[0] * self.shape[1])


@dataclass
class ModelSummary:
    """Sizes of a model folder's tensors; `layers` lists the quantized linears (none for a dense model)."""

    total_bytes: int
    layers: list[LayerSummary] = field(default_factory=list)
    dense_linears: list[str] = field(default_factory=list)
    dense_layers: list[LayerSummary] = field(default_factory=list)  # the dense linears stored in the folder
    format: str | None = None
    quantization_config: dict = field(default_factory=dict, repr=False)

    @property
    def quantized_bits_per_weight(self) -> float | None:
        return _bits_per_weight(self.layers)

    @property
    def block_bits_per_weight(self) -> float | None:
        """Over the linear layers of the numbered decoder blocks, dense ones included: what a
        `--bits auto:B` budget bounds."""
        return _bits_per_weight([layer for layer in self.layers + self.dense_layers if BLOCK_LAYER.search(layer.name)])

    def to_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "quantized_bits_per_weight": self.quantized_bits_per_weight,
            "block_bits_per_weight": self.block_bits_per_weight,
            "format": self.format,
            "layers": [{**{key: value for key, value in asdict(layer).items() if key != "spec"},
                        "bits_per_weight": layer.bits_per_weight} for layer in self.layers],
            "dense_linears": self.dense_linears,
        }


def summarize(folder: Path) -> ModelSummary:
    config = model_config(folder)
    infos = tensor_infos(folder)
    summary = ModelSummary(total_bytes=sum(info.nbytes for info in infos.values()))
    if "quantization_config" not in config:
        return summary
    fmt = format_for(config)
    quantization_config = config["quantization_config"]
    names = fmt.layer_names(infos)
    schemes = fmt.layer_schemes(quantization_config, names)
    shapes = fmt.layer_shapes(folder, names, infos)
    for name in names:
        stored = [infos[f"{name}.{suffix}"] for suffix in fmt.layer_suffixes if f"{name}.{suffix}" in infos]
        summary.layers.append(LayerSummary(name, shapes[name], schemes[name].describe(), sum(s.nbytes for s in stored),
                                           fmt.act_order(quantization_config, name, infos), schemes[name]))
    summary.dense_linears = fmt.dense_linears(quantization_config)
    summary.format, summary.quantization_config = fmt.name, quantization_config
    for name in summary.dense_linears:
        info = infos.get(f"{name}.weight")
        if info is not None:
            summary.dense_layers.append(LayerSummary(name, tuple(info.shape), "dense", info.nbytes))
    return summary


BLOCK_LAYER = re.compile(r"\.\d+\.")  # a module inside a numbered block (model.layers.3.mlp.up_proj)


def _bits_per_weight(layers: list[LayerSummary]) -> float | None:
    weights = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    return 8 * sum(layer.bytes for layer in layers) / weights if weights else None

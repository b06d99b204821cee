"""Build a runnable model from a local folder: dense Hugging Face weights, or a quantized checkpoint
whose quantized linears become `QuantLinear` modules.

Quantized models are built from their config with empty weights (transformers' own modeling code),
then every tensor is assigned from the checkpoint; nothing is initialised twice and nothing is
unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.calibrate.kv_scales import split_scale_tensors
from qtool.quantize.format import QuantizedCheckpoint, read_checkpoint
from qtool.quantize.format.checkpoint import load_tensors, model_config, tensor_infos
from qtool.runtime.lazy import LazyWeights, build_skeleton, read_config
from qtool.runtime.quant_linear import QuantLinear

STORED_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
log = logging.getLogger(__name__)


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise QtoolError(f"cannot load a tokenizer from {folder}: {error}") from None


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the first floating-point tensor of a folder is stored in (float32 if none is)."""
    for info in tensor_infos(folder).values():
        if info.dtype in STORED_FLOAT_DTYPES:
            return STORED_FLOAT_DTYPES[info.dtype]
    return torch.float32


def load_model(
    folder: Path, dtype: torch.dtype | None = torch.float32, device: str = "cpu", trust_remote_code: bool = False,
    native: bool = False,
) -> nn.Module:
    """The model in `folder` in eval mode on `device`; dense tensors in `dtype` (None: as stored).
    `native`: qtool's runtime model code (the Llama family) instead of transformers'."""
    config = model_config(folder)
    stored = stored_dtype(folder)  # reads the file headers: refuses pickle-only or empty folders
    dtype = dtype or stored
    if "quantization_config" in config:
        model = _load_quantized(folder, read_checkpoint(folder), dtype, trust_remote_code, native)
    elif native:
        model = _load_into(build_skeleton(folder, dtype, trust_remote_code, native=True), folder, {}, load_tensors(folder),
                           dtype)
    else:
        model = _load_dense(folder, dtype, trust_remote_code)
    return model.to(device).eval()


def supports_native(folder: Path, trust_remote_code: bool = False) -> bool:
    """Whether qtool's runtime model code runs the model in `folder`."""
    from qtool.runtime.models.llama import LlamaSpec

    try:
        LlamaSpec.from_config(read_config(folder, trust_remote_code))
    except QtoolError:
        return False
    return True


def load_lazily(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool = False, linear_dtype: torch.dtype | None = None
) -> tuple[nn.Module, LazyWeights | None]:
    """A dense model whose weights stay on disk until `LazyWeights.load` asks for them (linear
    layers' weights in `linear_dtype`, default `dtype`); a folder that stores them under other
    names than the model's (transformers renames legacy keys while loading) is loaded whole
    instead, in `dtype`, with None for the lazy weights."""
    if "quantization_config" in model_config(folder):
        raise QtoolError(f"{folder} is already quantized; quantize its original model instead")
    model = build_skeleton(folder, dtype, trust_remote_code)
    weights = LazyWeights(model, folder, dtype, linear_dtype)
    if weights.missing:
        log.info("%s stores %s under other names; loading the whole model", folder, weights.missing[0])
        return load_model(folder, dtype, trust_remote_code=trust_remote_code), None
    return model, weights


def _load_dense(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        raise QtoolError(f"cannot load the model in {folder}: {error}") from None


def _load_quantized(
    folder: Path, checkpoint: QuantizedCheckpoint, dtype: torch.dtype, trust_remote_code: bool, native: bool = False
) -> nn.Module:
    model = build_skeleton(folder, dtype, trust_remote_code, native)
    return _load_into(model, folder, checkpoint.weights, checkpoint.dense, dtype)


def _load_into(model: nn.Module, folder: Path, weights: dict, dense: dict[str, torch.Tensor],
               dtype: torch.dtype) -> nn.Module:
    """Fill an empty model: quantized linears become `QuantLinear`s, every other tensor is assigned.
    KV-cache scales (for vLLM and transformers) set no parameter: qtool's runtime measures its own
    (`qtool.runtime.kv_cache`)."""
    split_scale_tensors(dense)
    for name, weight in weights.items():
        _replace_linear(model, name, weight, dense.pop(f"{name}.bias", None))
    dense = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in dense.items()}
    result = model.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:
        raise QtoolError(f"{folder} holds tensors the model does not have: {', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise QtoolError(f"{folder} lacks tensors the model needs: {', '.join(missing[:5])}")
    return model


def _replace_linear(model: nn.Module, name: str, weight, bias: torch.Tensor | None) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
    except AttributeError:
        raise QtoolError(f"the checkpoint quantizes {name}, which the model does not have") from None
    if not isinstance(original, nn.Linear) or (original.out_features, original.in_features) != weight.shape:
        raise QtoolError(f"{name}: stored shape {weight.shape} does not match the model's layer {original}")
    setattr(parent, child, QuantLinear(weight, bias))

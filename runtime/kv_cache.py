"""Which dtype the runtime's KV cache holds, and the float8 cache's per-head scales.

`--kv-cache-dtype fp8` stores keys and values as float8 e4m3, one byte each, so the same memory
holds twice the tokens of an fp16 cache. Each attention layer then needs a scale per kv head
(`qtool.calibrate.kv_scales`): the checkpoint's own when it has them (`qtool quantize
--kv-cache-dtype fp8` writes them, as llm-compressor does), else measured when the model is
loaded, on a few windows of the offline calibration text (random tokens for a model without a
tokenizer). Perplexity then runs K and V through the same float8 rounding, so `qtool eval
--kv-cache-dtype fp8` measures what the cache costs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qtool.calibrate.kv_scales import kv_cache_dtype, observing_native_kv
from qtool.errors import QtoolError

log = logging.getLogger(__name__)
CALIBRATION_WINDOWS, CALIBRATION_SEQLEN = 8, 512
CALIBRATION_SOURCE = "wiki-leads"


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """qtool runtime attention modules by name (those that can hold a float8 cache)."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "kv_cache_dtype")}


def use_kv_cache_dtype(model: nn.Module, name: str, tokenizer=None, data_dir=None) -> None:
    """Make `model`'s attention layers keep K and V as a cache of `name` ("auto" or "fp8") would."""
    dtype = kv_cache_dtype(name)
    if dtype is None:
        return
    attentions = attention_layers(model)
    if not attentions:
        raise QtoolError("--kv-cache-dtype fp8 needs qtool's runtime model code (the Llama family); "
                         "this model runs through transformers")
    scales = getattr(model, "stored_kv_scales", None) or {}
    if not scales:
        scales = measure_kv_scales(model, tokenizer, data_dir)
    for layer, attention in attentions.items():
        for which in ("k_scale", "v_scale"):
            stored = scales.get(f"{layer}.{which}")
            if stored is None:
                raise QtoolError(f"the checkpoint's KV-cache scales lack {layer}.{which}")
            buffer = getattr(attention, which)
            if stored.numel() not in (1, buffer.numel()):
                raise QtoolError(f"{layer}.{which} holds {stored.numel()} scales for {buffer.numel()} kv heads")
            buffer.copy_(stored.reshape(-1).float().expand(buffer.numel()))
        attention.kv_cache_dtype = dtype


@torch.no_grad()
def measure_kv_scales(model: nn.Module, tokenizer=None, data_dir=None) -> dict[str, torch.Tensor]:
    """Per-head scales from the largest |K| and |V| the model writes on a few calibration windows."""
    windows = _calibration_windows(model, tokenizer, data_dir)
    log.info("KV-cache scales measured at load on %d windows of %d tokens of %s", *windows.shape,
             CALIBRATION_SOURCE if tokenizer is not None else "random tokens")
    device = next(model.parameters()).device
    with observing_native_kv(model) as amax:
        for window in windows:
            model(window.to(device).unsqueeze(0))
    return amax.scale_tensors()


def _calibration_windows(model: nn.Module, tokenizer, data_dir) -> torch.Tensor:
    from qtool.calibrate.data import calibration_windows, load_text, tokenize

    seqlen = min(CALIBRATION_SEQLEN, model.spec.max_positions)
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(model.spec.vocab_size, (CALIBRATION_WINDOWS, seqlen), generator=generator)
    tokens = tokenize(tokenizer, load_text(CALIBRATION_SOURCE, data_dir))
    return calibration_windows(tokens, CALIBRATION_WINDOWS, seqlen, seed=0)

"""Which dtype the runtime's KV cache holds, and how keys and values fit a float8 cache.

`--kv-cache-dtype fp8` stores keys and values as float8 e4m3, one byte each, so the same memory
holds twice the tokens of an fp16 cache. Rounded as they are, keys cost SmolLM2-135M most of the
cache's loss (+0.99% of perplexity in all): a few channels of each head carry large values that
barely change from token to token, and three mantissa bits on those move every score. So the
runtime stores each head's keys less their mean (softmax ignores a shift common to all of a
query's scores) and turned by an orthonormal Hadamard matrix, with queries turned alike (dot
products unchanged), which spreads what is left evenly over the channels; then the loss is
+0.18% (benchmarks/results/kv_fp8_smollm2.md). Those means and the per-head scales (largest value over
448) are measured when the model is loaded, on 8 windows of 512 tokens of the offline calibration
text (random tokens for a model without a tokenizer). A checkpoint's own `k_scale` / `v_scale`
(`qtool quantize --kv-cache-dtype fp8`) describe keys as vLLM and transformers store them, as
they are, and are not used here. Perplexity runs K and V through the same rounding, so `qtool
eval --kv-cache-dtype fp8` measures what the cache costs.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from qtool.calibrate.kv_scales import kv_cache_dtype, observing_native_attention, scales_from_amax
from qtool.errors import QtoolError

log = logging.getLogger(__name__)
CALIBRATION_WINDOWS, CALIBRATION_SEQLEN = 8, 512
CALIBRATION_SOURCE = "wiki-leads"


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """qtool runtime attention modules by name (those that can hold a float8 cache)."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "kv_cache_dtype")}


def hadamard(size: int) -> torch.Tensor | None:
    """The orthonormal Hadamard matrix of a power-of-two `size` (Sylvester's construction); None otherwise."""
    if size & (size - 1):
        return None
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix / math.sqrt(size)


@torch.no_grad()
def use_kv_cache_dtype(model: nn.Module, name: str, tokenizer=None, data_dir=None) -> None:
    """Make `model`'s attention layers keep K and V as a cache of `name` ("auto" or "fp8") would:
    for fp8, key means, rotation and scales measured on calibration windows."""
    dtype = kv_cache_dtype(name)
    if dtype is None:
        return
    attentions = attention_layers(model)
    if not attentions:
        raise QtoolError("--kv-cache-dtype fp8 needs qtool's runtime model code (the Llama family); "
                         "this model runs through transformers")
    windows = _calibration_windows(model, tokenizer, data_dir)
    log.info("float8 KV cache: key means and scales measured on %d windows of %d tokens of %s", *windows.shape,
             CALIBRATION_SOURCE if tokenizer is not None else "random tokens")
    sums = _observe(model, windows, lambda attention, keys, values: keys.double().sum(dim=0), torch.add)
    tokens = windows.numel()
    for layer, attention in attentions.items():
        attention.k_offset.copy_(sums[layer] / tokens)
        rotation = hadamard(attention.spec.head_dim)
        attention.k_rotation = None if rotation is None else rotation.to(attention.k_offset.device)
    key_amax = _observe(model, windows, lambda attention, keys, values: _head_amax(
        attention.turn(keys - attention.k_offset.to(keys.dtype))), torch.maximum)
    value_amax = _observe(model, windows, lambda attention, keys, values: _head_amax(values), torch.maximum)
    for layer, attention in attentions.items():
        attention.k_scale.copy_(scales_from_amax(key_amax[layer]))
        attention.v_scale.copy_(scales_from_amax(value_amax[layer]))
        attention.kv_cache_dtype = dtype


def _head_amax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().float().amax(dim=(0, 2))


def _observe(model: nn.Module, windows: torch.Tensor, measure, combine) -> dict[str, torch.Tensor]:
    """`measure(attention, keys, values)` of every attention layer on every window, folded over
    the windows with `combine` (torch.add, torch.maximum)."""
    seen: dict[str, torch.Tensor] = {}

    def observer_for(layer, attention):
        def observe(keys, values):
            value = measure(attention, keys, values)
            seen[layer] = value if layer not in seen else combine(seen[layer], value)
        return observe

    device = next(model.parameters()).device
    with observing_native_attention(model, observer_for):
        for window in windows:
            model(window.to(device).unsqueeze(0))
    return seen


def _calibration_windows(model: nn.Module, tokenizer, data_dir) -> torch.Tensor:
    from qtool.calibrate.data import calibration_windows, load_text, tokenize

    seqlen = min(CALIBRATION_SEQLEN, model.spec.max_positions)
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(model.spec.vocab_size, (CALIBRATION_WINDOWS, seqlen), generator=generator)
    tokens = tokenize(tokenizer, load_text(CALIBRATION_SOURCE, data_dir))
    return calibration_windows(tokens, CALIBRATION_WINDOWS, seqlen, seed=0)

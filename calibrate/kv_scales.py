"""Per-head scales of a float8 KV cache, from the largest |K| and |V| each attention head writes.

A float8 (e4m3) cache holds K / s and V / s per kv head, saturated at +-448, so s = amax / 448
keeps every calibration value in range; e4m3 is a float format, so the scale only sets the range,
and a head's small values keep three mantissa bits down to amax / 2^15. The keys observed are
the ones the cache would hold: after the rotary embedding (and q/k norms), which is why the
observers sit where attention reads K and V, not on k_proj's outputs:
- `observing_transformers_kv`: around transformers' attention interface, while a model (e.g. one
  being quantized block by block) runs;
- `observing_native_kv`: on qtool's runtime model (`qtool.runtime.models.llama`), which must
  give the same scales (a test holds the two to it); `observing_native_attention` is its hook,
  which the runtime also uses to measure a float8 cache's key means and scales at load.

Stored as compressed-tensors does (`kv_cache_scheme`, strategy `attn_head`): tensors
`<attention module>.k_scale` and `.v_scale` of shape [kv_heads, 1, 1], float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.kernels.paged_attention import FP8, FP8_MAX

KV_CACHE_DTYPES = {"auto": None, "fp8": FP8}
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "attn_head", "dynamic": False, "symmetric": True}
SCALE_SUFFIXES = (".k_scale", ".v_scale")
OBSERVER_NAME = "qtool_kv_observer"


def kv_cache_dtype(name: str) -> torch.dtype | None:
    """The cache dtype of a --kv-cache-dtype value (None: the activations' dtype)."""
    if name not in KV_CACHE_DTYPES:
        raise QtoolError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name]


class KVAmax:
    """The largest |K| and |V| of each kv head, per attention module, over every call observed."""

    def __init__(self):
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def update(self, name: str, keys: torch.Tensor, values: torch.Tensor, head_dim: int) -> None:
        """`keys`, `values` with their kv heads along dimension `head_dim`."""
        for seen, tensor in ((self.keys, keys), (self.values, values)):
            dims = [d for d in range(tensor.dim()) if d != head_dim % tensor.dim()]
            amax = tensor.detach().abs().float().amax(dim=dims).cpu()
            seen[name] = amax if name not in seen else torch.maximum(seen[name], amax)

    def scale_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors: `<module>.k_scale` and `.v_scale` [kv_heads, 1, 1] for each module."""
        if not self.keys:
            raise QtoolError("no attention call was observed, so there are no KV-cache scales to write")
        tensors = {}
        for name in sorted(self.keys):
            tensors[f"{name}.k_scale"] = scales_from_amax(self.keys[name]).view(-1, 1, 1)
            tensors[f"{name}.v_scale"] = scales_from_amax(self.values[name]).view(-1, 1, 1)
        return tensors


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 per head (a head that only ever wrote zeros gets the scale of 1 / 448)."""
    return torch.where(amax > 0, amax, torch.ones_like(amax)).float() / FP8_MAX


@contextmanager
def observing_transformers_kv(model: nn.Module) -> Iterator[KVAmax]:
    """Record K and V of every attention call of a transformers `model` while inside: its attention
    implementation is wrapped by one that observes, then calls the original (sdpa where the
    original is eager, which transformers does not register)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    original = config._attn_implementation
    attend = ALL_ATTENTION_FUNCTIONS.get(original, sdpa_attention_forward)
    names = {module: name for name, module in model.named_modules()}
    amax = KVAmax()

    def observe(module, query, key, value, *args, **kwargs):
        amax.update(names[module], key, value, head_dim=1)  # [batch, kv_heads, tokens, head_dim]
        return attend(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(OBSERVER_NAME, observe)
    config._attn_implementation = OBSERVER_NAME
    try:
        yield amax
    finally:
        config._attn_implementation = original


@contextmanager
def observing_native_attention(model: nn.Module, observer_for) -> Iterator[None]:
    """While inside, each attention layer of qtool's runtime model hands the keys and values it
    writes to its cache ([tokens, kv_heads, head_dim]) to `observer_for(name, attention)`."""
    attentions = {name: module for name, module in model.named_modules() if hasattr(module, "kv_observer")}
    for name, attention in attentions.items():
        attention.kv_observer = observer_for(name, attention)
    try:
        yield
    finally:
        for attention in attentions.values():
            attention.kv_observer = None


@contextmanager
def observing_native_kv(model: nn.Module) -> Iterator[KVAmax]:
    """Record K and V as qtool's runtime model writes them to its cache, while inside."""
    amax = KVAmax()

    def observer_for(name, attention):
        return lambda keys, values: amax.update(name, keys, values, head_dim=1)

    with observing_native_attention(model, observer_for):
        yield amax


def split_scale_tensors(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the KV-cache scale tensors out of a checkpoint's dense tensors (they set no parameter)."""
    return {name: dense.pop(name) for name in [n for n in dense if n.endswith(SCALE_SUFFIXES)]}

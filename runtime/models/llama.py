"""The Llama family (Llama 2/3, Mistral, Qwen2/3, SmolLM) as plain modules built from a Hugging
Face config, with the same parameter names as transformers' own, so checkpoints load one to one.

RMSNorm, rotary embeddings (the rope-scaling variant of the config, with transformers' own
frequency tables), grouped-query attention, SwiGLU, tied embeddings, q/k/v biases (Qwen2) and
q/k norms (Qwen3). Linears are `nn.Linear` here; the loader swaps in `QuantLinear` for quantized
ones; q/k/v and gate/up then run as one product each on CUDA (`FusedLinears`). Products of a few
tokens are left pending (`qtool.kernels.pending`) for the kernel that reads them next: the norms
(after o and down), the rotary embedding with the cache store (after q/k/v), SiLU-and-multiply
(after gate/up) finish them as they read. Two ways to run:
- `model(input_ids [B, L])`: whole windows, causal attention within each (perplexity); returns an
  object with `.logits`, as transformers' models do.
- `model.forward_tokens(ids [T], positions [T], batch)`: the tokens of many sequences flattened,
  attention through the paged KV cache of a `PagedBatch` (`qtool.runtime.attention`); the engine's way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.kernels.elementwise import rms_norm, rotary, rotary_into_cache, silu_mul
from qtool.kernels.paged_attention import KVScales, round_trip
from qtool.kernels.pending import PendingSum
from qtool.runtime.attention import PagedBatch, cached_attention, causal_attention, paged_attention
from qtool.runtime.quant_linear import FusedLinears, pending_product

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaSpec:
    """What the model code reads from a config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    output_bias: bool
    qk_norm: bool
    max_positions: int

    @classmethod
    def from_config(cls, config) -> "LlamaSpec":
        """The spec of a supported config; QtoolError naming what is not supported otherwise."""
        family = getattr(config, "model_type", None)
        if family not in FAMILIES:
            raise QtoolError(f"qtool's runtime runs the Llama family ({', '.join(FAMILIES)}), not {family!r}")
        if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
            raise QtoolError(f"{family} config with a {config.hidden_act} MLP (or MLP biases) is not supported")
        heads = config.num_attention_heads
        bias = getattr(config, "attention_bias", None)
        bias = family == "qwen2" if bias is None else bool(bias)
        max_positions = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window and (family == "mistral" or getattr(config, "use_sliding_window", False)):
            max_positions = min(max_positions, window)  # within the window, attention is plain causal
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            attention_bias=bias,
            output_bias=bias and family != "qwen2",
            qk_norm=family == "qwen3",
            max_positions=max_positions,
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The normed x; with `residual`, (normed x + residual, x + residual): one kernel on CUDA."""
        return rms_norm(x, self.weight, self.eps, residual)


class Rotary(nn.Module):
    """cos and sin of each position's rotation angles [T, head_dim], in float32, from the
    frequencies transformers computes for the config's rope type (default, linear, dynamic,
    yarn, longrope, llama3)."""

    def __init__(self, config):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        parameters = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
        kind = parameters.get("rope_type", "default")
        if kind == "default":
            theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            inv_freq, self.scaling = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        elif kind in ROPE_INIT_FUNCTIONS and kind != "dynamic":
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[kind](config, None)
        else:
            raise QtoolError(f"rope type {kind!r} is not supported by qtool's runtime")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * self.scaling, angles.sin() * self.scaling


class Attention(nn.Module):
    def __init__(self, spec: LlamaSpec, index: int):
        super().__init__()
        self.spec, self.index = spec, index
        self.q_proj = nn.Linear(spec.hidden_size, spec.heads * spec.head_dim, bias=spec.attention_bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.kv_heads * spec.head_dim, bias=spec.attention_bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.kv_heads * spec.head_dim, bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.heads * spec.head_dim, spec.hidden_size, bias=spec.output_bias)
        self.qkv = FusedLinears(self, ("q_proj", "k_proj", "v_proj"))
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        # a float8 cache (qtool.runtime.kv_cache) holds keys moved into `key_space`, over k_scale, and V / v_scale
        self.kv_cache_dtype: torch.dtype | None = None
        self.register_buffer("k_scale", torch.ones(spec.kv_heads), persistent=False)
        self.register_buffer("v_scale", torch.ones(spec.kv_heads), persistent=False)
        self.register_buffer("k_offset", torch.zeros(spec.kv_heads, spec.head_dim), persistent=False)
        self.register_buffer("k_rotation", None, persistent=False)
        self.kv_observer = None  # called with (keys, values) [T, kv_heads, head_dim] after the rotary embedding

    def key_space(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys less their head's mean (a query's scores all shift alike, so softmax is unchanged),
        queries and keys turned by one orthonormal matrix (dot products unchanged)."""
        return self.turn(q), self.turn(k - self.k_offset.to(k.dtype))

    def turn(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.k_rotation is None else x @ self.k_rotation.to(x.dtype)

    @property
    def kv_scales(self) -> KVScales | None:
        return None if self.kv_cache_dtype is None else KVScales(self.k_scale, self.v_scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch | None,
                lengths: int | None) -> torch.Tensor:
        spec = self.spec
        # one launch rotates q and k and stores the keys and values in the cache, finishing q, k and v
        into_cache = batch is not None and self.kv_cache_dtype is None and self.kv_observer is None
        q, k, v = self.qkv(x, pending=into_cache and not spec.qk_norm)
        q = q.view(-1, spec.heads, spec.head_dim)
        k, v = k.view(-1, spec.kv_heads, spec.head_dim), v.view(-1, spec.kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        scale = spec.head_dim**-0.5
        if into_cache:
            q = rotary_into_cache(q, k, v, cos, sin, *batch.layer_cache(self.index), batch.slots)
            out = cached_attention(q, batch, self.index, scale)
        else:
            out = self._attention(q, k, v, cos, sin, batch, lengths, scale)
        return pending_product(self.o_proj, out.reshape(-1, spec.heads * spec.head_dim))

    def _attention(self, q, k, v, cos, sin, batch: PagedBatch | None, lengths: int | None, scale: float):
        """Attention where the keys are observed, moved into a float8 cache's key space, or not cached."""
        q, k = rotary(q, k, cos, sin)
        if self.kv_observer is not None:
            self.kv_observer(k, v)
        if self.kv_cache_dtype is not None:
            q, k = self.key_space(q, k)
        if batch is None:  # attention reads K and V as a cache of kv_cache_dtype would give them back
            k, v = round_trip(k, self.kv_cache_dtype, self.k_scale), round_trip(v, self.kv_cache_dtype, self.v_scale)
            return causal_attention(q, k, v, lengths, scale)
        return paged_attention(q, k, v, batch, self.index, scale, self.kv_scales)


class MLP(nn.Module):
    def __init__(self, spec: LlamaSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.gate_up = FusedLinears(self, ("gate_proj", "up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor | PendingSum:
        return pending_product(self.down_proj, silu_mul(*self.gate_up(x, pending=True)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, index)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, hidden, residual, cos, sin, batch, lengths):
        """(this layer's MLP output, the residual stream before it is added): each residual add is
        fused into the norm after it (the next layer's, or the final one)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, batch, lengths)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Backbone(nn.Module):
    """Holds what transformers' `model.` prefix holds: embeddings, layers, final norm."""

    def __init__(self, spec: LlamaSpec, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, index) for index in range(spec.layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = Rotary(config)


@dataclass
class Output:
    logits: torch.Tensor


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.spec = LlamaSpec.from_config(config)
        self.model = Backbone(self.spec, config)
        self.lm_head = nn.Linear(self.spec.hidden_size, self.spec.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, **_) -> Output:
        """Logits [B, L, V] of whole windows, causal within each."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        hidden = self._run(input_ids.reshape(-1), positions, None, length)
        return Output(self.lm_head(hidden).view(batch, length, -1))

    def forward_tokens(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """Hidden states [T, hidden] of flattened tokens, attention through the paged cache."""
        return self._run(ids, positions, batch, None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def _run(self, ids, positions, batch, lengths):
        hidden, residual = self.model.embed_tokens(ids), None
        cos, sin = self.model.rotary_emb(positions)
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, cos, sin, batch, lengths)
        return self.model.norm(hidden) if residual is None else self.model.norm(hidden, residual)[0]

"""Throughput and latency of the runtime under a load of concurrent requests, and random-weight
models of any Llama-family config for measuring where real weights are not at hand.

A load is `concurrency` requests of `prompt_len` random prompt tokens, each generating exactly
`output_len` tokens (greedy, EOS ignored), all added at once and run to the end. Reported: prefill
and decode tokens per second (the tokens of steps that prefilled / only decoded, over those
steps' time), overall output tokens per second, time to first token and inter-token latency
(p50 / p99 over requests and tokens), peak device memory (or the process's resident memory on a
CPU), KV-cache utilisation (tokens held over the tokens of the blocks in use, averaged over the
decode steps), preemptions, the most sequences running at once, and the tokens the cache holds.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.runtime.engine import Engine
from qtool.runtime.sampling import SamplingParams

PRESETS = {  # Llama-3 shapes, for --synthetic without a config file
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=True),
}


@dataclass
class LoadResult:
    concurrency: int
    prompt_len: int
    output_len: int
    seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    output_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    peak_memory_bytes: int
    kv_utilisation: float
    preemptions: int
    max_running: int
    cache_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def run_load(engine: Engine, concurrency: int, prompt_len: int, output_len: int, seed: int = 0) -> LoadResult:
    """Run one load to the end on `engine` (warm it up first: compilation is not measured)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.model.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    _reset_peak(engine.device)
    preempted_before = engine.scheduler.preemptions
    started = time.perf_counter()
    sequences = [engine.add(torch.randint(0, vocab, (prompt_len,), generator=generator).tolist(), params)
                 for _ in range(concurrency)]
    times: dict[int, list[float]] = {sequence.id: [] for sequence in sequences}
    prefill_tokens = prefill_seconds = decode_tokens = decode_seconds = 0.0
    utilisation, max_running = [], 0
    while not engine.scheduler.done:
        before = time.perf_counter()
        events = engine.step()
        after = time.perf_counter()
        max_running = max(max_running, engine.last_step.sequences)
        for event in events:
            times[event.sequence.id].append(after)
        tokens, decoding = engine.last_step.tokens, engine.last_step.decoding
        if decoding:
            decode_tokens, decode_seconds = decode_tokens + tokens, decode_seconds + after - before
            utilisation.append(_held_fraction(engine))
        else:
            prefill_tokens, prefill_seconds = prefill_tokens + tokens, prefill_seconds + after - before
    seconds = time.perf_counter() - started
    first = [stamps[0] - started for stamps in times.values()]
    gaps = [b - a for stamps in times.values() for a, b in zip(stamps, stamps[1:])]
    return LoadResult(
        concurrency, prompt_len, output_len, seconds,
        prefill_tokens / max(prefill_seconds, 1e-9), decode_tokens / max(decode_seconds, 1e-9),
        concurrency * output_len / seconds,
        *_percentiles(first), *_percentiles(gaps or [0.0]),
        _peak(engine.device), statistics.fmean(utilisation) if utilisation else 0.0,
        engine.scheduler.preemptions - preempted_before, max_running,
        engine.pool.total_blocks * engine.pool.block_size,
    )


def _held_fraction(engine: Engine) -> float:
    """Tokens in the cache over the tokens of the blocks holding them."""
    running = engine.scheduler.running
    blocks = sum(len(sequence.blocks) for sequence in running)
    return sum(sequence.computed for sequence in running) / max(blocks * engine.pool.block_size, 1)


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
    return pick(0.5), pick(0.99)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_config(spec: str):
    """A preset's name (llama3-8b, llama3-1b) or a config.json of the Llama family."""
    from transformers import AutoConfig, LlamaConfig

    if spec in PRESETS:
        return LlamaConfig(**PRESETS[spec])
    path = Path(spec)
    if path.is_file():
        data = json.loads(path.read_text())
        return AutoConfig.for_model(data.pop("model_type", "llama"), **data)
    raise QtoolError(f"--synthetic takes a preset ({', '.join(PRESETS)}) or a config.json file, not {spec!r}")


def synthetic_model(config, bits: int | None, group_size: int, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    """A random-weight model of `config` on `device`: its decoder linears quantized to random
    `bits`-bit codes (asymmetric, `group_size`) with plausible scales, or fp16 when `bits` is None."""
    from qtool.quantize import packing
    from qtool.quantize.qweight import QuantizedWeight
    from qtool.quantize.scheme import Scheme
    from qtool.runtime.models.llama import LlamaForCausalLM
    from qtool.runtime.quant_linear import QuantLinear

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
        if bits is not None:
            scheme = Scheme(bits, group_size, False)
            for name, linear in list(model.named_modules()):
                if isinstance(linear, nn.Linear) and ".layers." in name:
                    out_features, in_features = linear.weight.shape
                    groups = scheme.group_count(in_features)
                    codes = torch.randint(0, 2**bits, (out_features, in_features), device=device, dtype=torch.int32)
                    weight = QuantizedWeight(
                        packing.pack(codes, bits), torch.full((out_features, groups), 0.04 / 2**bits, dtype=dtype, device=device),
                        torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.int32, device=device),
                        scheme, (out_features, in_features))
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, QuantLinear(weight, linear.bias))
    model.tie_weights()
    return model.eval()

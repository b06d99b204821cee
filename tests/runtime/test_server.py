"""The OpenAI-compatible server on loopback, driven by the official `openai` client: answers equal
to offline generation, streaming, every refused request with its status and error object, an
abandoned stream freeing its pages, and a bounded load of concurrent streams."""

import asyncio
import json
import time

import httpx
import pytest

from qtool.runtime.async_engine import AsyncEngine
from qtool.runtime.engine import LLM
from qtool.runtime.sampling import SamplingParams
from qtool.runtime.server import create_app
from qtool.runtime.smoke import BackgroundServer, run_smoke

openai = pytest.importorskip("openai")
MODEL = "tiny"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, tmp_path_factory):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return LLM(folder, device="cpu", block_size=4)


@pytest.fixture(scope="module")
def server(llm):
    engine = AsyncEngine(llm.engine)
    with BackgroundServer(create_app(engine, llm.tokenizer, MODEL)) as running:
        running.engine = engine
        yield running
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def fresh_engine(llm):
    """An engine of its own over the served model, for the answers to expect."""
    from qtool.runtime.engine import Engine

    return Engine(llm.model, llm.tokenizer, "cpu", llm.engine.dtype, block_size=4)


def offline(llm, prompt, max_tokens):
    engine = fresh_engine(llm)
    sequence = engine.add(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    return engine.run()[sequence.id]


def test_completions_answer_what_offline_generation_gives(client, llm):
    reply = client.completions.create(model=MODEL, prompt="The history of", max_tokens=7, temperature=0)
    expected = offline(llm, "The history of", 7)
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_completions_whole_and_streamed_agree(client, llm):
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert whole.choices[0].message.role == "assistant"
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert whole.choices[0].message.content == offline(llm, ids, 9).text


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("qtool_requests_total", "qtool_generated_tokens_total", "qtool_requests_waiting", "qtool_kv_cache_usage",
                 "qtool_request_latency_seconds_count", "qtool_time_to_first_token_seconds_sum"):
        assert name in metrics


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "other", "prompt": "hi"}).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "n": 2}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "temperature": -1}).encode(), 400, None),
    (json.dumps({"model": MODEL, "prompt": "hi", "stop": ["a"] * 9}).encode(), 400, "stop"),
    (json.dumps({"model": MODEL, "prompt": "hi", "logprobs": 3}).encode(), 400, "logprobs"),
    (json.dumps({"model": MODEL, "prompt": [10**9]}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "word " * 600, "max_tokens": 100}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode(), 413, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    reply = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_bad_chat_messages(server):
    reply = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user"}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"


def test_an_api_key_is_required_when_set(llm):
    engine = AsyncEngine(llm.engine)
    try:
        with BackgroundServer(create_app(engine, llm.tokenizer, MODEL, api_key="secret")) as server:
            denied = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
            wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="guess", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            right = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
            assert right.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason
            assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    finally:
        engine.close()


def test_a_client_that_leaves_mid_stream_frees_its_pages(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while server.engine.load()["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    load = server.engine.load()
    assert load["kv_blocks_used"] == 0 and load["running"] == 0 and load["waiting"] == 0


def test_sixty_four_concurrent_streams_each_get_their_own_answer(server, llm):
    """Three rounds of 64 streaming requests with different prompts: each answer complete and the
    one offline generation gives; no pages held after each round."""
    prompts = [f"Item {index} of the list is" for index in range(64)]
    fresh = fresh_engine(llm)
    sequences = [fresh.add(prompt, SamplingParams(temperature=0, max_tokens=6)) for prompt in prompts]
    done = fresh.run()
    expected = [done[sequence.id].text for sequence in sequences]

    async def one(client, prompt):
        started, text = time.perf_counter(), ""
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, time.perf_counter() - started

    async def round_():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, prompt) for prompt in prompts))

    for _ in range(3):
        results = asyncio.run(round_())
        assert [text for text, _ in results] == expected
        assert server.engine.load()["kv_blocks_used"] == 0
        latencies = sorted(seconds for _, seconds in results)
        print(f"64 streams: p50 {latencies[32] * 1e3:.0f} ms, p99 {latencies[63] * 1e3:.0f} ms")


def test_smoke_checks_a_running_server(server):
    report = run_smoke(server.url, MODEL, 4, max_tokens=5)
    assert not report.failures and report.requests == 8 and "ok" in report.line()


def test_sigterm_lets_a_request_in_flight_finish(llm):
    """`qtool serve` in its own process: SIGTERM while a stream is running; the stream still ends
    with [DONE] and the process exits cleanly."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "qtool.cli.app", "serve", str(llm_folder(llm)), "--port", str(port),
                                "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError(f"the server did not start: {process.stderr.read() if process.poll() is not None else ''}")
                time.sleep(0.2)
        body = {"model": str(llm_folder(llm)), "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0,
                "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 1:
                    process.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def llm_folder(llm):
    return llm.folder

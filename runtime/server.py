"""`qtool serve`: the runtime's engine behind an OpenAI-compatible HTTP API, for smoke tests.

POST /v1/completions and /v1/chat/completions (whole answers, or server-sent chunks with
`stream: true`), GET /v1/models, /health and /metrics (Prometheus text). Concurrent requests share
the engine through continuous batching (`AsyncEngine`). With an API key every /v1 request needs
`Authorization: Bearer KEY`. FastAPI and uvicorn are the optional extra `qtool[serve]`: only
`qtool serve` imports this module.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from qtool.runtime.async_engine import AsyncEngine
from qtool.runtime.openai_api import Answer, ApiError, Request, parse, sse

MAX_BODY_BYTES = 1 << 20


@dataclass
class Metrics:
    """Counters for /metrics."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    latency_seconds: list[float] = field(default_factory=list)
    first_token_seconds: list[float] = field(default_factory=list)

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def text(self, load: dict) -> str:
        lines = ["# TYPE qtool_requests_total counter"]
        lines += [f'qtool_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
        lines += ["# TYPE qtool_prompt_tokens_total counter", f"qtool_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE qtool_generated_tokens_total counter", f"qtool_generated_tokens_total {self.generated_tokens}",
                  "# TYPE qtool_requests_waiting gauge", f"qtool_requests_waiting {load['waiting']}",
                  "# TYPE qtool_requests_running gauge", f"qtool_requests_running {load['running']}",
                  "# TYPE qtool_kv_cache_usage gauge",
                  f"qtool_kv_cache_usage {load['kv_blocks_used'] / max(load['kv_blocks_total'], 1):.6f}",
                  "# TYPE qtool_preemptions_total counter", f"qtool_preemptions_total {load['preemptions']}"]
        for name, values in (("request_latency", self.latency_seconds), ("time_to_first_token", self.first_token_seconds)):
            lines += [f"# TYPE qtool_{name}_seconds summary", f"qtool_{name}_seconds_count {len(values)}",
                      f"qtool_{name}_seconds_sum {sum(values):.6f}"]
        return "\n".join(lines) + "\n"


def create_app(engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    app = FastAPI(title="qtool", docs_url=None, redoc_url=None)
    metrics = Metrics()
    app.state.metrics, app.state.engine = metrics, engine

    @app.exception_handler(ApiError)
    async def refused(request: HttpRequest, error: ApiError):
        metrics.count(request.url.path, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def authenticate(request: HttpRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key")
                metrics.count(request.url.path, 401)
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(engine.load()))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "qtool"}]}

    async def answer(http: HttpRequest, kind: str):
        started = time.perf_counter()
        request = parse(await http.body(), kind, model_name, max_body_bytes)
        prompt = _prompt_ids(request, tokenizer, engine)
        reply = Answer(kind, model_name)
        path = http.url.path
        if request.stream:
            metrics.count(path, 200)
            return StreamingResponse(_chunks(engine, prompt, request, reply, metrics, started),
                                     media_type="text/event-stream")
        text, reason, count = "", "length", 0
        async for delta in engine.stream(prompt, request.params):
            if count == 0:
                metrics.first_token_seconds.append(time.perf_counter() - started)
            count += 1
            text += delta.text
            if delta.finished is not None:
                reason, count = delta.finished.finish_reason, len(delta.finished.token_ids)
        metrics.count(path, 200)
        metrics.prompt_tokens += len(prompt)
        metrics.generated_tokens += count
        metrics.latency_seconds.append(time.perf_counter() - started)
        return reply.whole(text, reason, len(prompt), count)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await answer(http, "completion")

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        return await answer(http, "chat")

    return app


def _prompt_ids(request: Request, tokenizer, engine: AsyncEngine) -> list[int]:
    """The request's prompt as token ids (chat messages through the tokenizer's chat template),
    refused when it cannot fit the model's context with the tokens it asks for."""
    if request.kind == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        ids = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    elif isinstance(request.prompt, str):
        ids = tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = list(request.prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    vocab = engine.engine.model.spec.vocab_size
    if any(not 0 <= token < vocab for token in ids):
        raise ApiError(400, f"prompt token ids must be from 0 to {vocab - 1}", "prompt")
    context = engine.engine.scheduler.max_model_len
    if context is not None and len(ids) + request.params.max_tokens > context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({request.params.max_tokens}) exceeds "
                            f"the model's context of {context} tokens", "max_tokens", "context_length_exceeded")
    return ids


async def _chunks(engine: AsyncEngine, prompt: list[int], request: Request, reply: Answer, metrics: Metrics,
                  started: float):
    """Server-sent events: a first chunk (the chat role), one per delta, the last with its finish
    reason, usage when asked, then [DONE]. Closing the connection midway aborts the request."""
    if reply.kind == "chat":
        yield sse(reply.chunk(None, first=True))
    count = 0
    try:
        async for delta in engine.stream(prompt, request.params):
            if count == 0:
                metrics.first_token_seconds.append(time.perf_counter() - started)
            count += 1
            if delta.finished is None:
                if delta.text:
                    yield sse(reply.chunk(delta.text))
                continue
            count = len(delta.finished.token_ids)
            yield sse(reply.chunk(delta.text or None, delta.finished.finish_reason))
            if request.include_usage:
                yield sse(reply.usage_chunk(len(prompt), count))
            yield sse("[DONE]")
    finally:
        metrics.prompt_tokens += len(prompt)
        metrics.generated_tokens += count
        metrics.latency_seconds.append(time.perf_counter() - started)


def serve(app, host: str, port: int, shutdown_seconds: float = 30.0) -> None:
    """Run `app` until SIGINT / SIGTERM; requests in flight get `shutdown_seconds` to finish, then
    this returns (uvicorn hands the signal back once it is done: a quiet handler takes it, so the
    caller can close the engine and exit 0)."""
    import signal

    import uvicorn

    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_seconds)
    finally:
        for sig, previous in quiet.items():
            signal.signal(sig, previous)

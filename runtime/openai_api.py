"""OpenAI's completion and chat-completion requests, checked field by field, and the shapes of
their answers (whole, or as server-sent chunks).

Checking by hand rather than through a schema library keeps every refusal in OpenAI's own error
object, with the status a client expects: 400 for a bad field, 404 for an unknown model, 413 for a
body or prompt too large, 401 for a missing key.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from qtool.errors import QtoolError
from qtool.runtime.sampling import SamplingParams

MAX_TOKENS_LIMIT = 4096
MAX_STOPS = 4
UNSUPPORTED = {  # fields refused unless they hold one of these (their "off" values)
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None,), "tools": (None, []), "functions": (None, []),
}


class ApiError(Exception):
    """A request refused: HTTP status, OpenAI error type, message and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kinds = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}
        return {"error": {"message": self.message, "type": kinds.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A checked request: the prompt (text or token ids, or chat messages) and its sampling."""

    kind: str  # "completion" | "chat"
    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse(body: bytes, kind: str, model_name: str, max_body_bytes: int) -> Request:
    if len(body) > max_body_bytes:
        raise ApiError(413, f"the request body is {len(body)} bytes; the limit is {max_body_bytes}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")
    if data.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    for name, allowed in UNSUPPORTED.items():
        if data.get(name) not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    stream = _typed(data, "stream", bool, False)
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    prompt = messages = None
    if kind == "completion":
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
            raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    else:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with text content",
                           "messages")
    limit_name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in data else "max_tokens"
    max_tokens = _typed(data, limit_name, int, 16)
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ApiError(400, f"'{limit_name}' must be from 1 to {MAX_TOKENS_LIMIT}, got {max_tokens}", limit_name)
    stop = data.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a string or up to {MAX_STOPS} non-empty strings", "stop")
    try:
        params = SamplingParams(
            temperature=_typed(data, "temperature", (int, float), 1.0),
            top_p=_typed(data, "top_p", (int, float), 1.0),
            top_k=_typed(data, "top_k", int, -1),
            max_tokens=max_tokens,
            stop=tuple(stop),
            seed=_typed(data, "seed", int, None),
        )
    except QtoolError as error:
        raise ApiError(400, str(error)) from None
    return Request(kind, prompt, messages, params, stream, bool(options.get("include_usage")))


def _typed(data: dict, name: str, kind, default):
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        expected = getattr(kind, "__name__", None) or " or ".join(k.__name__ for k in kind)
        raise ApiError(400, f"'{name}' must be of type {expected}, got {type(value).__name__}", name)
    return value


class Answer:
    """The response objects of one request."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(), "choices": [choice], "usage": _usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(chunk=True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(chunk=True), "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}

    def _head(self, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()

"""`qtool serve --smoke`: start the server on a free loopback port, fire concurrent requests of
every kind at it, check every answer, and report.

Each request is greedy with its own prompt, asked twice, whole and streamed: the two answers must
be equal, non-empty and end for a known reason; a streamed answer must end with [DONE]. The
latencies are those of the whole answers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

SUBJECTS = ["rivers", "the moon", "bread", "music", "winter", "trains", "bees", "glass", "maps", "salt",
            "clocks", "forests"]


@dataclass
class SmokeReport:
    requests: int
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def line(self) -> str:
        ordered = sorted(self.latencies) or [0.0]
        p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        state = "ok" if not self.failures else f"{len(self.failures)} FAILED"
        return (f"smoke: {self.requests} requests ({self.requests // 2} whole, {self.requests // 2} streamed), {state}; "
                f"latency p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def run_smoke(url: str, model: str, count: int, max_tokens: int = 16, api_key: str | None = None) -> SmokeReport:
    return asyncio.run(_smoke(url, model, count, max_tokens, api_key))


async def _smoke(url: str, model: str, count: int, max_tokens: int, api_key: str | None) -> SmokeReport:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = SmokeReport(2 * count)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        checks = [_check(client, model, index, max_tokens, report) for index in range(count)]
        await asyncio.gather(*checks)
    return report


async def _check(client, model: str, index: int, max_tokens: int, report: SmokeReport) -> None:
    chat = index % 2 == 0
    subject = SUBJECTS[index % len(SUBJECTS)]
    prompt = f"Request {index}: write one sentence about {subject}."
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        started = time.perf_counter()
        whole = await client.post(path, json=body)
        report.latencies.append(time.perf_counter() - started)
        if whole.status_code != 200:
            report.failures.append(f"request {index}: HTTP {whole.status_code} from {path}: {_message(whole)}")
            return
        choice = whole.json()["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        streamed, reason = await _stream(client, path, {**body, "stream": True}, chat)
        if choice["finish_reason"] not in ("stop", "length") or reason != choice["finish_reason"]:
            report.failures.append(f"request {index}: finish reasons {choice['finish_reason']!r} / {reason!r}")
        elif streamed != text or not text and choice["finish_reason"] == "length":
            report.failures.append(f"request {index}: streamed {streamed!r} but whole {text!r}")
    except Exception as error:  # noqa: BLE001 - every failure is reported, none stops the others
        report.failures.append(f"request {index}: {type(error).__name__}: {error}")


def _message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


async def _stream(client, path: str, body: dict, chat: bool) -> tuple[str, str | None]:
    text, reason, done = "", None, False
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            choice = json.loads(line[6:])["choices"][0]
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
            reason = choice["finish_reason"] or reason
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    return text, reason



"""The engine behind an asyncio server: requests stream their tokens as the engine produces them.

One background thread steps the engine while it has work and sleeps otherwise; coroutines add
requests and read their deltas from a queue each. All access to the engine goes through one lock,
so adding and aborting requests is safe while it steps. A stream that is closed before its request
finished (the client went away) aborts the request, which frees its cache blocks at once.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from qtool.runtime.engine import Engine, RequestOutput
from qtool.runtime.sampling import SamplingParams
from qtool.runtime.scheduler import Sequence


@dataclass
class Delta:
    """New output of one request: the token, the text it adds, and the finished output at the end."""

    token: int
    text: str
    finished: RequestOutput | None = None


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[str]]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="qtool-engine", daemon=True)
        self.thread.start()

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """The deltas of a new request, until it finishes."""
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            sequence = self.engine.add(prompt, params)
            self.listeners[sequence.id] = (asyncio.get_running_loop(), queue, [""])
            self.work.notify()
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finished is not None
                yield delta
        finally:
            if not finished:
                self.abort(sequence)

    def abort(self, sequence: Sequence) -> None:
        with self.lock:
            self.listeners.pop(sequence.id, None)
            self.engine.scheduler.abort(sequence)

    def load(self) -> dict:
        """Queue and cache figures for metrics."""
        with self.lock:
            scheduler, pool = self.engine.scheduler, self.engine.pool
            return {"waiting": len(scheduler.waiting), "running": len(scheduler.running),
                    "kv_blocks_used": pool.total_blocks - pool.free_blocks, "kv_blocks_total": pool.total_blocks,
                    "preemptions": scheduler.preemptions}

    def close(self, timeout: float | None = None) -> None:
        """Stop stepping (requests in flight are left unfinished) and wait for the thread."""
        with self.lock:
            self.stopping = True
            self.work.notify()
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.lock:
                while self.engine.scheduler.done and not self.stopping:
                    self.work.wait()
                if self.stopping:
                    return
                try:
                    events = self.engine.step()
                except Exception as error:  # noqa: BLE001 - handed to every waiting stream, not swallowed
                    for loop, queue, _ in self.listeners.values():
                        loop.call_soon_threadsafe(queue.put_nowait, error)
                    self.listeners.clear()
                    for sequence in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
                        self.engine.scheduler.abort(sequence)
                    continue
                deliveries = []
                for event in events:
                    listener = self.listeners.get(event.sequence.id)
                    if listener is None:
                        continue
                    loop, queue, seen = listener
                    text = event.finished.text if event.finished else _settled(self.engine.text_of(event.sequence),
                                                                                  event.sequence.params)
                    delta = Delta(event.token, text[len(seen[0]):], event.finished)
                    seen[0] = text
                    if event.finished:
                        del self.listeners[event.sequence.id]
                    deliveries.append((loop, queue, delta))
            for loop, queue, delta in deliveries:
                loop.call_soon_threadsafe(queue.put_nowait, delta)


def _settled(text: str, params: SamplingParams) -> str:
    """The text that can be sent now: a tail that may be the start of a stop string is held back
    until the next tokens (or the end) tell."""
    hold = max((len(stop) - 1 for stop in params.stop), default=0)
    return text[: len(text) - hold] if hold else text

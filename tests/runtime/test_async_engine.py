"""Streaming through the background engine thread: the same tokens as offline generation, text
deltas that add up to the final text, and aborts that free their blocks."""

import asyncio

from qtool.runtime.async_engine import AsyncEngine
from qtool.runtime.sampling import SamplingParams

from test_engine import PROMPTS, engine_for, pair


def collect(engine: AsyncEngine, prompt, params):
    async def run():
        return [delta async for delta in engine.stream(prompt, params)]

    return asyncio.run(run())


def test_streams_give_the_offline_tokens_and_text():
    _, model = pair(std=0.5)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    offline = engine_for(model)
    expected = [offline.run()[s.id] for s in [offline.add(p, params) for p in PROMPTS[:1]]][0]
    engine = AsyncEngine(engine_for(model))
    try:
        deltas = collect(engine, PROMPTS[0], params)
    finally:
        engine.close()
    assert [d.token for d in deltas] == expected.token_ids
    assert "".join(d.text for d in deltas) == deltas[-1].finished.text == expected.text


def test_concurrent_streams_and_an_abandoned_one():
    _, model = pair(std=0.5)
    engine = AsyncEngine(engine_for(model, block_size=4))
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def run():
        async def first_two(prompt):
            stream = engine.stream(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
            got = [await stream.__anext__(), await stream.__anext__()]
            await stream.aclose()  # the client goes away
            return got

        whole = [asyncio.create_task(_all(engine.stream(p, params))) for p in PROMPTS]
        abandoned = await first_two(PROMPTS[1])
        return [await task for task in whole], abandoned

    try:
        finished, abandoned = asyncio.run(run())
        assert all(len(deltas) == 5 and deltas[-1].finished.finish_reason == "length" for deltas in finished)
        assert len(abandoned) == 2
        assert engine.load()["kv_blocks_used"] == 0 and engine.load()["running"] == 0
    finally:
        engine.close()


async def _all(stream):
    return [delta async for delta in stream]


def test_stop_strings_are_never_streamed():
    _, model = pair(std=0.5)
    offline = engine_for(model)
    probe = offline.add([5, 17, 99], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = offline.run()[probe.id].token_ids
    stop = f"{tokens[2]} {tokens[3]}"
    engine = AsyncEngine(engine_for(model))
    try:
        deltas = collect(engine, [5, 17, 99], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[stop]))
    finally:
        engine.close()
    streamed = "".join(d.text for d in deltas)
    assert stop not in streamed and streamed == deltas[-1].finished.text
    assert len(deltas) == 4  # stopped at the token completing it

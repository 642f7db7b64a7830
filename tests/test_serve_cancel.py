"""Clients that leave: their requests are aborted in the worker and everything comes back.

20 concurrent greedy streams against a server that runs 4 at a time; 10 are cancelled at chosen
points (while queued, during the prefill of a long prompt, mid-decode; two of them non-streaming).
The 10 others must produce exactly the text and token count of a run without cancellations, and
within 1 s of the last one finishing the worker must report nothing running or waiting and every
KV block free.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from serve_helpers import MODEL, ServerProcess

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def _prompt(i: int) -> str:
    rng = random.Random(i)
    n = 400 if i % 5 == 0 else 8 + i  # every fifth prompt is long: its prefill takes a while
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(n))


def _body(i: int, stream: bool) -> dict:
    b = {"model": MODEL, "prompt": _prompt(i), "max_tokens": 16 + i % 8, "temperature": 0,
         "ignore_eos": True, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


async def _stream(c: httpx.AsyncClient, i: int, cancel_after_chunks: int | None = None):
    """(text, completion tokens) of a stream; returns None where it was cancelled on purpose."""
    text, usage, chunks = "", None, 0
    async with c.stream("POST", "/v1/completions", json=_body(i, True)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            if obj["choices"]:
                text += obj["choices"][0]["text"]
                chunks += 1
                if cancel_after_chunks is not None and chunks >= cancel_after_chunks:
                    return None  # leaving the block closes the connection mid-stream
            else:
                usage = obj["usage"]["completion_tokens"]
    return text, usage


async def _cancel_after(coro, seconds: float):
    task = asyncio.create_task(coro)
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


@pytest.fixture(scope="module")
def srv(default_engine):
    s = ServerProcess(default_engine, "--max-num-seqs", "4")
    try:
        s.wait_ready()
        yield s
        assert s.stop() == 0
    finally:
        s.close()


def test_cancelled_requests_free_everything_and_do_not_disturb_the_others(srv):
    survivors = list(range(0, 20, 2))
    cancelled = [i for i in range(20) if i not in survivors]

    async def reference():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            return await asyncio.gather(*[_stream(c, i) for i in survivors])

    want = asyncio.run(reference())

    async def mixed():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=40)) as c:
            jobs = {}
            for i in survivors:
                jobs[i] = _stream(c, i)
            plan = dict(zip(cancelled, ["queued", "queued", "prefill", "prefill", "decode", "decode",
                                        "decode", "decode", "nonstream", "nonstream"]))
            for i, how in plan.items():
                if how == "queued":  # leaves while waiting for one of the 4 slots
                    jobs[i] = _cancel_after(_stream(c, i), 0.2)
                elif how == "prefill":  # a long prompt, gone before its first token
                    jobs[i] = _cancel_after(_stream(c, 100 + 5 * i), 0.6)
                elif how == "decode":
                    jobs[i] = _stream(c, i, cancel_after_chunks=1 + i % 5)
                else:
                    jobs[i] = _cancel_after(c.post("/v1/completions", json=_body(i, False)), 1.0 + 0.3 * i)
            order = sorted(jobs)
            results = dict(zip(order, await asyncio.gather(*[jobs[i] for i in order])))
            return results, time.monotonic()

    results, finished = asyncio.run(mixed())
    assert [results[i] for i in survivors] == want
    assert all(results[i] is None for i in cancelled)
    assert all(n == _body(i, True)["max_tokens"] for (_, n), i in zip(want, survivors))
    while not srv.engine_idle():
        assert time.monotonic() - finished < 1.0, srv.metrics()
        time.sleep(0.05)
    m = srv.metrics()
    aborted = m.get_value("kiln:request_success_total", finished_reason="abort")
    gone = m.get_value("kiln:request_rejected_total", reason="client_gone")
    assert aborted + gone >= 8  # every cancel but those that left before being admitted

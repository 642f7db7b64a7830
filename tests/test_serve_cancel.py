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
from serve_helpers import MODEL, ServerProcess, serving

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
    with serving(default_engine, "--max-num-seqs", "4") as s:
        yield s


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


def test_a_client_that_stops_reading_does_not_hold_its_slots(default_engine):
    """The engine paces generation, not the socket: once the engine is done with a request whose
    client reads nothing, its running slots are free for others. The response (16 choices with
    20 logprobs each, ~6 MB of events) is larger than the socket buffers can absorb."""
    import socket

    s = ServerProcess(default_engine, "--max-num-seqs", "16", "--request-timeout", "5",
                      "--kv-cache-memory", "256MiB")
    try:
        s.wait_ready()
        n, tokens = 16, 250
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                           "n": n, "max_tokens": tokens, "logprobs": True, "top_logprobs": 20,
                           "temperature": 1.0, "ignore_eos": True, "stream": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 120
        m = s.metrics()
        while m.get_value("kiln:generation_tokens_total") < n * tokens and time.monotonic() < deadline:
            time.sleep(0.1)  # the engine generates every token though nobody reads them
            m = s.metrics()
        assert m.get_value("kiln:generation_tokens_total") == n * tokens
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "n": n},
                       timeout=30)
        assert r.status_code == 200, r.text  # the slots came back although the first client reads nothing
        sock.close()
        assert s.stop() == 0
    finally:
        s.close()


def test_tokens_of_abandoned_requests_are_counted(srv):
    before = srv.metrics().get_value("kiln:generation_tokens_total")

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            assert await _stream(c, 3, cancel_after_chunks=5) is None

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while not srv.engine_idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.metrics().get_value("kiln:generation_tokens_total") - before >= 5

"""Admission control: the Admission class alone, then a real server under overload."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_helpers import MODEL, ServerProcess, serving
from test_serve_errors import assert_error

from kiln.serve.admission import Admission, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_admission_slots_queue_priority_and_release():
    async def main():
        a = Admission(max_running_seqs=2, max_queue=3, max_queued_tokens=100)
        t1, t2 = a.enter(1), a.enter(1)
        assert t1.granted and t2.granted and a.running_seqs == 2
        low, high, mid = a.enter(1, priority=5), a.enter(1, priority=-1), a.enter(1, priority=0)
        with pytest.raises(Overloaded) as e:
            a.enter(1)
        assert e.value.reason == "queue_full"
        order = []

        async def waiter(t, name):
            await a.wait(t, 5)
            order.append(name)

        tasks = [asyncio.create_task(waiter(t, n)) for t, n in ((low, "low"), (high, "high"), (mid, "mid"))]
        await asyncio.sleep(0)
        a.release(t1)
        await asyncio.sleep(0.01)
        assert order == ["high"]
        a.release(t2)
        a.release(t2)  # idempotent
        await asyncio.sleep(0.01)
        assert order == ["high", "mid"] and a.running_seqs == 2 and a.waiting == 1
        a.release(high)
        a.release(mid)
        await asyncio.gather(*tasks)
        assert order == ["high", "mid", "low"]
        a.release(low)
        assert (a.running_seqs, a.running_requests, a.waiting, a.queued_tokens) == (0, 0, 0, 0)

    run(main())


def test_admission_tokens_timeout_and_shutdown():
    async def main():
        a = Admission(max_running_seqs=1, max_queue=5, max_queued_tokens=100)
        running = a.enter(1)
        q1 = a.enter(1)
        a.set_tokens(q1, 80)
        q2 = a.enter(1)
        with pytest.raises(Overloaded) as e:
            a.set_tokens(q2, 30)  # 80 + 30 > 100: refused, its place given back
        assert e.value.reason == "queued_tokens" and a.waiting == 1
        with pytest.raises(Overloaded):
            a.enter(1, min_tokens=21)  # a lower bound of its prompt already exceeds the budget
        assert a.waiting == 1
        with pytest.raises(asyncio.TimeoutError):
            await a.wait(q1, 0.05)
        assert a.waiting == 0 and a.queued_tokens == 0
        q3 = a.enter(2)  # needs 2 slots: waits even after one frees... until both are free
        w = asyncio.create_task(a.wait(q3, 5))
        await asyncio.sleep(0.01)
        assert not w.done()
        a.cancel_waiting()
        with pytest.raises(Overloaded) as e:
            await w
        assert e.value.reason == "draining" and a.waiting == 0
        a.release(running)
        assert a.running_seqs == 0

    run(main())


@pytest.fixture(scope="module")
def small_server(default_engine):
    with serving(default_engine, "--max-num-seqs", "1", "--max-queue", "1") as srv:
        yield srv


async def _timed_post(client: httpx.AsyncClient, path: str, body: dict):
    t0 = time.perf_counter()
    r = await client.post(path, json=body)
    return r, time.perf_counter() - t0


def test_overload_ten_concurrent_two_served_eight_refused_fast(small_server):
    body = {"model": MODEL, "prompt": "Count to a hundred: 1, 2,", "max_tokens": 32, "temperature": 0,
            "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=60) as c:
            await c.get("/health")  # warm the connection pool's first connection
            return await asyncio.gather(*[_timed_post(c, "/v1/completions", body) for _ in range(10)])

    results = run(main())
    ok = [r for r, _ in results if r.status_code == 200]
    refused = [(r, dt) for r, dt in results if r.status_code == 503]
    assert len(ok) == 2 and len(refused) == 8, [r.status_code for r, _ in results]
    for r, dt in refused:
        assert_error(r, 503)
        assert r.headers["retry-after"].isdigit()
        assert dt < 0.05, f"503 took {dt * 1000:.1f} ms"
    assert ok[0].json()["choices"][0]["text"] == ok[1].json()["choices"][0]["text"]
    m = small_server.metrics()
    assert m.get_value("kiln:request_rejected_total", reason="queue_full") == 8
    deadline = time.monotonic() + 2
    while not small_server.engine_idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert small_server.engine_idle()


def test_queue_timeout_408_and_queued_token_budget(default_engine):
    srv = ServerProcess(default_engine, "--max-num-seqs", "1", "--max-queue", "4", "--request-timeout", "0.5",
                        "--max-queued-tokens", "50")
    try:
        srv.wait_ready()
        long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0,
                "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                first = asyncio.create_task(c.post("/v1/completions", json=long))
                while not (await asyncio.to_thread(srv.metrics)).get_value("kiln:num_requests_running"):
                    await asyncio.sleep(0.02)  # until the first one runs
                big = await c.post("/v1/completions", json={**long, "prompt": [1] * 60, "max_tokens": 1})
                t0 = time.perf_counter()
                waited = await c.post("/v1/completions", json={**long, "max_tokens": 1})
                dt = time.perf_counter() - t0
                r1 = await first
                after = await c.post("/v1/completions", json={**long, "max_tokens": 2})
                return big, waited, dt, r1, after

        big, waited, dt, r1, after = run(main())
        assert_error(big, 503)  # 60 prompt tokens would exceed the 50 queued-token budget
        assert_error(waited, 408)
        assert 0.45 < dt < 3.0
        assert r1.status_code == 200 and after.status_code == 200  # the timed-out place was given back
        m = srv.metrics()
        assert m.get_value("kiln:request_rejected_total", reason="timeout") == 1
        assert m.get_value("kiln:request_rejected_total", reason="queued_tokens") == 1
        assert srv.stop() == 0
    finally:
        srv.close()

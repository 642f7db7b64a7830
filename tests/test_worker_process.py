"""The inference worker as a real separate process, driven through EngineClient (the API side).

The reference for token output is the in-process offline engine (itself checked against
transformers in test_default_model.py): the same request must give the same tokens across the
process boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from kiln import LLM, SamplingParams
from kiln.engine.core import EngineOptions
from kiln.errors import RequestError
from kiln.serve.engine_client import EngineClient, WorkerDied

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "1, 2, 3, 4,"]
OPTS = EngineOptions(device="cpu", skip_verify=True, kv_cache_memory=64 << 20)


@pytest.fixture(scope="module")
def reference(default_engine):
    llm = LLM(default_engine, device="cpu", skip_verify=True)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    return llm, [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]


async def collect(client: EngineClient, ids: list[int], params: SamplingParams, rid=None) -> dict:
    out: dict[str, dict] = {}
    async for d in client.generate(ids, params, rid):
        o = out.setdefault(d.request_id, {"tokens": [], "text": "", "finish": None})
        o["tokens"] += d.token_ids
        o["text"] += d.text
        o["finish"] = d.finish_reason
    return out


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def started(engine):
    """A client with its worker process running; on exit the worker must shut down cleanly."""
    client = EngineClient(engine, OPTS)
    await client.start()
    try:
        yield client
    finally:
        assert await client.close() == 0


async def assert_worker_idle(client: EngineClient) -> None:
    s = await client.fresh_stats()
    assert (s.running, s.waiting, s.free_blocks) == (0, 0, s.total_blocks)


def test_worker_matches_the_offline_engine_and_frees_everything(default_engine, reference):
    llm, want = reference

    async def main():
        async with started(default_engine) as client:
            assert client.ready.pid != os.getpid() and client.proc.pid == client.ready.pid
            greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            results = await asyncio.gather(*[collect(client, llm.encode_prompt(p), greedy) for p in PROMPTS])
            got = [next(iter(r.values()))["tokens"] for r in results]
            assert got == want
            # stop strings are found on the API side; the worker is told and frees the blocks
            text = llm.tokenizer.decode(want[0])
            stop = text[3:6]
            r = await collect(client, llm.encode_prompt(PROMPTS[0]),
                              SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
            (o,) = r.values()
            assert o["finish"] == "stop" and o["text"] == text[:3]
            # n = 2 with a seed: two different choices, reproducible
            p = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=2)
            a = await collect(client, llm.encode_prompt(PROMPTS[1]), p, "s1")
            b = await collect(client, llm.encode_prompt(PROMPTS[1]), p, "s2")
            assert [v["tokens"] for v in a.values()] == [v["tokens"] for v in b.values()]
            assert a["s1-0"]["tokens"] != a["s1-1"]["tokens"]
            await assert_worker_idle(client)

    run(main())


def test_refusal_and_early_exit_abort(default_engine, reference):
    llm, _ = reference

    async def main():
        async with started(default_engine) as client:
            with pytest.raises(RequestError) as e:
                await collect(client, [5] * 4096, SamplingParams(max_tokens=4))
            assert e.value.param == "prompt" and "4096" in str(e.value)
            # a consumer that stops reading aborts its request in the worker
            gen = client.generate(llm.encode_prompt(PROMPTS[1]),
                                  SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
            async for d in gen:
                if d.token_ids:  # the first token: the request is running in the worker
                    break
            await gen.aclose()
            await assert_worker_idle(client)

    run(main())


def test_killed_worker_ends_streams_with_an_error(default_engine, reference):
    llm, _ = reference

    async def main():
        client = EngineClient(default_engine, OPTS)
        await client.start()
        gen = client.generate(llm.encode_prompt(PROMPTS[1]),
                              SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        with pytest.raises(WorkerDied):
            async for _ in gen:
                os.kill(client.proc.pid, signal.SIGKILL)
        assert not client.alive and client.proc.returncode == -signal.SIGKILL
        with pytest.raises(WorkerDied):
            await collect(client, [1, 2, 3], SamplingParams(max_tokens=2))
        await client.close()

    run(main())

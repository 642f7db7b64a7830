"""Overlapped steps (EngineOptions.overlap_steps): decode step N+1 is scheduled and launched before
step N's tokens are read, its input tokens taken from step N's output on the device.

The reference is the same engine stepping one step at a time (overlap off), itself checked against
transformers elsewhere. On the CPU the overlap buys no time, but it runs the very bookkeeping the
GPU does: scheduling ahead, device-side input tokens, dropping the extra token of a request that
stopped, aborts and preemption while a step is in flight.
"""

from __future__ import annotations

import pytest

from kiln.engine.request import Request
from kiln.engine.scheduler import Scheduler, SchedulerConfig
from kiln.llm import LLM
from kiln.sampling_params import SamplingParams

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "In 1969, the first humans",
    "A list of fruits: apple, banana,",
]


def _llm(engine, overlap: bool, **options) -> LLM:
    return LLM(engine, device="cpu", skip_verify=True, overlap_steps=overlap, **options)


@pytest.fixture(scope="module")
def stepwise(default_engine):
    return _llm(default_engine, False)


@pytest.fixture(scope="module")
def overlapped(default_engine):
    return _llm(default_engine, True)


def _no_leak(llm: LLM) -> None:
    assert not llm.core.has_unfinished()
    s = llm.core.scheduler.stats()
    assert s["free_blocks"] == s["total_blocks"], "blocks leaked"


def _ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_with_natural_stops_matches_stepwise(stepwise, overlapped):
    # Different lengths, EOS allowed, a stop string: rows leave the batch while a step is ahead.
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (40, 3, 17, 1, 29, 8)]
    params[2] = SamplingParams(max_tokens=30, temperature=0.0, stop=["\n"])
    ref = stepwise.generate(PROMPTS, params)
    ahead0 = overlapped.core.num_ahead_steps
    got = overlapped.generate(PROMPTS, params)
    assert _ids(got) == _ids(ref)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in ref]
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in ref]
    assert overlapped.core.num_ahead_steps - ahead0 > 20, "steps were not launched ahead"
    assert stepwise.core.num_ahead_steps == 0
    _no_leak(overlapped)


def test_seeded_sampling_matches_stepwise(stepwise, overlapped):
    # Draws keyed by (seed, step): a step scheduled ahead must use the step index it will have.
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=s, ignore_eos=True)
              for s in range(4)]
    params.append(SamplingParams(max_tokens=24, temperature=0.7, min_p=0.05, seed=11, ignore_eos=True,
                                 min_tokens=5))
    ref = stepwise.generate(PROMPTS[:5], params)
    ahead0 = overlapped.core.num_ahead_steps
    got = overlapped.generate(PROMPTS[:5], params)
    assert _ids(got) == _ids(ref)
    assert overlapped.core.num_ahead_steps - ahead0 > 10
    _no_leak(overlapped)


def test_rows_that_need_their_history_step_by_step(stepwise, overlapped):
    # Penalties count the output so far and logprobs come back with the tokens: no step ahead.
    params = [SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)]
    ref = stepwise.generate(PROMPTS[:2], params)
    ahead0 = overlapped.core.num_ahead_steps
    got = overlapped.generate(PROMPTS[:2], params)
    assert _ids(got) == _ids(ref)
    assert overlapped.core.num_ahead_steps == ahead0
    lp_ref = [(t.logprob, t.top) for t in ref[1].outputs[0].logprobs] if ref[1].outputs[0].logprobs else None
    lp_got = [(t.logprob, t.top) for t in got[1].outputs[0].logprobs] if got[1].outputs[0].logprobs else None
    assert lp_got == lp_ref
    _no_leak(overlapped)


def test_abort_while_a_step_is_ahead(stepwise, overlapped):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ref = stepwise.generate(PROMPTS[:3], greedy)
    ids = [overlapped.add_request(overlapped.encode_prompt(p), greedy)[0] for p in PROMPTS[:3]]
    got: dict[str, list[int]] = {i: [] for i in ids}
    reasons = {}
    for d in overlapped.stream():
        got[d.request_id] += d.token_ids
        if d.finish_reason is not None:
            reasons[d.request_id] = d.finish_reason
        elif d.request_id == ids[1] and len(got[ids[1]]) >= 5:
            overlapped.abort(ids[1])
    assert reasons[ids[1]] == "abort"
    assert got[ids[1]] == ref[1].outputs[0].token_ids[:len(got[ids[1]])] and len(got[ids[1]]) < 20
    assert got[ids[0]] == ref[0].outputs[0].token_ids
    assert got[ids[2]] == ref[2].outputs[0].token_ids
    _no_leak(overlapped)


def test_preemption_with_overlap(default_engine, stepwise):
    # 6 sequences of up to ~50 tokens need ~24 blocks of 16; 9 blocks force preemption.
    greedy = SamplingParams(max_tokens=36, temperature=0.0, ignore_eos=True)
    ref = stepwise.generate(PROMPTS, greedy)
    llm = _llm(default_engine, True, kv_cache_memory=9 * 16 * 46080 + 1)
    got = llm.generate(PROMPTS, greedy)
    assert _ids(got) == _ids(ref)
    assert llm.core.scheduler.num_preemptions > 0
    assert llm.core.num_ahead_steps > 0
    _no_leak(llm)


# ------------------------------------------------------------------ Scheduler.schedule_ahead alone

def _sched(num_blocks=64, max_num_seqs=4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_tokens=64, max_seq_len=64,
                                     block_size=4, num_blocks=num_blocks))


def _req(rid: str, n_prompt: int, max_tokens: int) -> Request:
    return Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens))


def _decode_step(s: Scheduler):
    """Schedule and fold steps in (token 7 each) until the next step is a pure decode step."""
    while True:
        out = s.schedule()
        if all(c.num_new_tokens == 1 for c in out.chunks):
            return out
        s.update(out, [7] * sum(c.samples for c in out.chunks))


def test_schedule_ahead_continues_each_row_one_token_later():
    s = _sched()
    a, b = _req("a", 4, 10), _req("b", 6, 10)
    s.add_request(a)
    s.add_request(b)
    prev = _decode_step(s)
    nxt = s.schedule_ahead(prev)
    assert nxt is not None and nxt.ahead
    assert [(c.request.request_id, c.start, c.num_new_tokens, c.samples) for c in nxt.chunks] == [
        ("a", prev.chunks[0].end, 1, True), ("b", prev.chunks[1].end, 1, True)]
    # a's next token is its 6th (position 5): a second block is allocated for it ahead of time
    assert len(a.block_ids) == 2
    s.update(prev, [7, 8])
    s.update(nxt, [9, 9])
    assert a.num_computed_tokens == nxt.chunks[0].end and a.output_token_ids[-2:] == [7, 9]


def test_schedule_ahead_drops_rows_that_end_by_length():
    s = _sched()
    a, b = _req("a", 4, 2), _req("b", 4, 10)
    s.add_request(a)
    s.add_request(b)
    prev = _decode_step(s)  # a's second and last token is decoded in prev
    nxt = s.schedule_ahead(prev)
    assert [c.request.request_id for c in nxt.chunks] == ["b"]


def test_schedule_ahead_defers_to_normal_scheduling():
    s = _sched(max_num_seqs=4)
    s.add_request(_req("a", 4, 10))
    prev = _decode_step(s)
    s.add_request(_req("late", 4, 10))  # a free seat and a waiting request: admit it normally
    assert s.schedule_ahead(prev) is None
    # Out of blocks: schedule() must preempt, which schedule_ahead never does. Three usable blocks
    # of 4 tokens; two 3-token prompts decode position 3, and position 4 needs a block each.
    s2 = _sched(num_blocks=4)
    s2.add_request(_req("a", 3, 5))
    s2.add_request(_req("b", 3, 5))
    prev2 = _decode_step(s2)
    assert [c.start for c in prev2.chunks] == [3, 3] and s2.kv.pool.num_free == 1
    assert s2.schedule_ahead(prev2) is None
    assert s2.kv.pool.num_free == 1  # nothing allocated

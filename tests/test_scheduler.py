"""Scheduler: continuous batching, chunked prefill, prefix caching, preemption, stops, aborts.

A fake runner stands in for the model: it keeps a fake KV cache (block -> slot -> token), checks
that every chunk reads a correct prefix and writes only into private blocks, and 'samples' a
token determined by the tokens it reads back from that cache.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.engine.request import FinishReason, Request, RequestStatus
from kiln.engine.scheduler import Scheduler, SchedulerConfig
from kiln.errors import RequestError
from kiln.sampling_params import SamplingParams

EOS = 3


def next_token(seq, eos_mod=0):
    v = (sum(seq) * 7 + len(seq)) % 50 + 10
    return EOS if eos_mod and v % eos_mod == 0 else v


class FakeRunner:
    def __init__(self, sched: Scheduler, eos_mod: int = 0):
        self.s = sched
        self.bs = sched.config.block_size
        self.kv: dict[int, dict[int, int]] = {}
        self.eos_mod = eos_mod
        self.outputs = []
        self.log = []  # per step: [(request_id, start, num_new_tokens, samples)] at schedule time

    def execute(self, out):
        pool, bs, sampled = self.s.kv.pool, self.bs, []
        for c in out.chunks:
            req = c.request
            assert c.start == req.num_computed_tokens and c.num_new_tokens >= 1
            assert len(req.block_ids) * bs >= c.end, "block table does not cover the chunk"
            for i in range(c.start):  # the computed prefix (cached or ours) must be intact
                assert self.kv[req.block_ids[i // bs]][i % bs] == req.token_at(i)
            for i in range(c.start, c.end):
                b = req.block_ids[i // bs]
                assert b != 0 and pool.ref_count(b) == 1 and pool.block_hash(b) is None
                self.kv.setdefault(b, {})[i % bs] = req.token_at(i)
            if c.samples:
                seq = [self.kv[req.block_ids[i // bs]][i % bs] for i in range(c.end)]
                sampled.append(next_token(seq, self.eos_mod))
        return sampled

    def step(self):
        out = self.s.schedule()
        self.outputs.append(out)
        self.log.append([(c.request.request_id, c.start, c.num_new_tokens, c.samples) for c in out.chunks])
        finished = self.s.update(out, self.execute(out))
        return out, finished

    def run(self, max_steps=1000):
        done = []
        for _ in range(max_steps):
            if not self.s.has_unfinished:
                return done
            done += self.step()[1]
        raise AssertionError("scheduler did not go idle")


def reference_output(prompt, params, max_seq_len, eos_mod=0):
    seq, out = list(prompt), []
    while True:
        t = next_token(seq, eos_mod)
        seq.append(t)
        out.append(t)
        if len(out) >= params.min_tokens:
            if (t == EOS and not params.ignore_eos) or t in params.stop_token_ids:
                return out
        if len(out) >= params.max_tokens or len(seq) >= max_seq_len:
            return out


def cfg(**kw):
    base = dict(max_num_seqs=8, max_num_tokens=64, max_seq_len=256, block_size=4, num_blocks=64)
    base.update(kw)
    return SchedulerConfig(**base)


def mk(rid, prompt, max_tokens=4, **kw):
    leader = kw.pop("leader", None)
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **kw),
                   prefill_leader=leader, eos_token_ids=(EOS,))


def assert_all_free(s: Scheduler):
    pool = s.kv.pool
    assert pool.num_free == pool.num_usable
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))
    assert not s.running and not s.waiting and not s.has_unfinished


# ---------------------------------------------------------------- prefix caching
@pytest.mark.parametrize("tail, expect_cached", [([90, 91, 92], 12), ([], 8)])
def test_shared_prefix_hits(tail, expect_cached):
    s = Scheduler(cfg())
    r = FakeRunner(s)
    prefix = list(range(20, 32))  # 3 blocks of 4
    s.add_request(mk("a", prefix + [50, 51], max_tokens=2))
    r.run()
    b = mk("b", prefix + tail, max_tokens=3)
    s.add_request(b)
    out, _ = r.step()
    [c] = out.chunks
    assert b.num_cached_tokens == expect_cached and c.start == expect_cached
    assert c.num_new_tokens == len(prefix + tail) - expect_cached
    r.run()
    assert b.output_token_ids == reference_output(prefix + tail, b.params, 256)
    st_ = s.stats()
    assert st_["prefix_hits"] == expect_cached and st_["cached_blocks"] >= 3
    assert_all_free(s)


def test_prefix_caching_disabled_computes_everything():
    s = Scheduler(cfg(enable_prefix_caching=False))
    r = FakeRunner(s)
    s.add_request(mk("a", range(16), max_tokens=1))
    r.run()
    b = mk("b", range(16), max_tokens=1)
    s.add_request(b)
    out, _ = r.step()
    assert out.chunks[0].start == 0 and b.num_cached_tokens == 0
    assert s.stats()["cached_blocks"] == 0


# ---------------------------------------------------------------- chunked prefill
def test_chunked_prefill_alone_then_admits_behind_it():
    s = Scheduler(cfg(max_num_tokens=32))
    r = FakeRunner(s)
    long = mk("long", range(100, 200), max_tokens=2)
    short = mk("short", [1, 2, 3], max_tokens=2)
    s.add_request(long)
    s.add_request(short)
    sizes = []
    for _ in range(4):
        r.step()
        sizes.append([(rid, n, smp) for rid, _, n, smp in r.log[-1]])
    assert sizes[:3] == [[("long", 32, False)]] * 3
    assert sizes[3] == [("long", 4, True), ("short", 3, True)]
    assert long.num_output_tokens == 1 and long.first_token_time is not None
    r.run()
    assert_all_free(s)


def test_chunked_prefill_shares_steps_with_decodes():
    s = Scheduler(cfg(max_num_tokens=32))
    r = FakeRunner(s)
    for i in range(2):
        s.add_request(mk(f"d{i}", [5 + i, 6, 7], max_tokens=20, ignore_eos=True))
    r.step()  # both prefill and sample their first token
    long = mk("long", range(100, 200), max_tokens=1)
    s.add_request(long)
    seen = []
    while not long.is_finished:
        out, _ = r.step()
        ids = {c.request.request_id: c.num_new_tokens for c in out.chunks}
        assert ids["d0"] == 1 and ids["d1"] == 1  # decodes every step
        seen.append(ids["long"])
        assert out.num_batched_tokens <= 32
    assert seen == [30, 30, 30, 10]


# ---------------------------------------------------------------- preemption
def test_preemption_of_most_recently_admitted():
    # bs 2, 6 usable blocks; each request grows to 4 + 7 = 11 tokens (6 blocks).
    s = Scheduler(cfg(block_size=2, num_blocks=7, max_seq_len=64))
    r = FakeRunner(s)
    a = mk("a", [1, 2, 3, 4], max_tokens=7, ignore_eos=True)
    b = mk("b", [9, 8, 7, 6], max_tokens=7, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    preempted = []
    b_outputs_at_preempt = None
    for _ in range(200):
        if not s.has_unfinished:
            break
        out, _ = r.step()
        if out.preempted and b_outputs_at_preempt is None:
            b_outputs_at_preempt = list(b.output_token_ids)
            assert b.status == RequestStatus.PREEMPTED and b.block_ids == []
            assert b.num_computed_tokens == 0 and s.waiting[0] is b
        preempted += [p.request_id for p in out.preempted]
    assert preempted and set(preempted) == {"b"}
    assert b.num_preemptions >= 1 and s.stats()["preemptions"] == len(preempted)
    assert b.output_token_ids[: len(b_outputs_at_preempt)] == b_outputs_at_preempt
    for q in (a, b):
        assert q.finish_reason == FinishReason.LENGTH
        assert q.output_token_ids == reference_output(q.prompt_token_ids, q.params, 64)
    assert_all_free(s)


def test_preempted_request_recomputes_with_outputs():
    s = Scheduler(cfg(block_size=2, num_blocks=7, max_seq_len=64))
    r = FakeRunner(s)
    a = mk("a", [1, 2, 3, 4], max_tokens=7, ignore_eos=True)
    b = mk("b", [9, 8, 7, 6], max_tokens=7, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    while not any(o.preempted for o in r.outputs):
        r.step()
    n_out = b.num_output_tokens
    while b.status != RequestStatus.RUNNING:
        out, _ = r.step()
    [(_, start, n, smp)] = [x for x in r.log[-1] if x[0] == "b"]
    assert start + n == 4 + n_out and smp  # prompt + outputs so far recomputed
    r.run()
    assert_all_free(s)


# ---------------------------------------------------------------- refusals
def test_refusals():
    s = Scheduler(cfg(max_seq_len=32, block_size=4, num_blocks=5))  # 4 usable blocks = 16 tokens
    with pytest.raises(RequestError) as e:
        s.add_request(mk("e", []))
    assert e.value.param == "prompt"
    with pytest.raises(RequestError) as e:
        s.add_request(mk("x", range(30), max_tokens=5))
    assert e.value.param == "max_tokens"
    assert str(e.value) == ("prompt (30 tokens) + max_tokens (5) = 35 exceeds the engine's "
                            "max sequence length 32")
    with pytest.raises(RequestError) as e:
        s.add_request(mk("y", range(40), max_tokens=1))
    assert e.value.param == "prompt" and "40" in str(e.value) and "32" in str(e.value)
    with pytest.raises(RequestError) as e:
        s.add_request(mk("z", range(10), max_tokens=10))  # 20 tokens: 5 blocks > 4
    assert e.value.param == "max_tokens" and "5" in str(e.value) and "4" in str(e.value)
    s.add_request(mk("ok", range(10), max_tokens=6))  # exactly 4 blocks
    with pytest.raises(RequestError) as e:
        s.add_request(mk("ok", [1]))
    assert e.value.param == "request_id"
    assert s.num_waiting == 1 and list(s.requests) == ["ok"]


# ---------------------------------------------------------------- ordering and gating
def test_priority_order_and_preempted_go_first():
    s = Scheduler(cfg(max_num_seqs=1))
    r = FakeRunner(s)
    s.add_request(mk("low", [1], priority=5, max_tokens=1))
    s.add_request(mk("hi1", [2], priority=0, max_tokens=1))
    s.add_request(mk("hi2", [3], priority=0, max_tokens=1))
    s.add_request(mk("mid", [4], priority=2, max_tokens=1))
    order = []
    while s.has_unfinished:
        out, _ = r.step()
        order += [c.request.request_id for c in out.chunks]
    assert order == ["hi1", "hi2", "mid", "low"]


def test_preempted_goes_to_front_of_its_priority():
    s = Scheduler(cfg(block_size=2, num_blocks=7, max_seq_len=64, max_num_seqs=2))
    r = FakeRunner(s)
    a = mk("a", [1, 2, 3, 4], max_tokens=7, ignore_eos=True)
    b = mk("b", [9, 8, 7, 6], max_tokens=7, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    r.step()
    s.add_request(mk("c", [5, 5], max_tokens=1))  # same priority, arrived earlier than the preemption
    s.add_request(mk("urgent", [6], max_tokens=1, priority=-1))
    while not any(o.preempted for o in r.outputs):
        r.step()
    assert [q.request_id for q in s.waiting] == ["urgent", "b", "c"]
    r.run()
    assert_all_free(s)


def test_n_siblings_wait_for_leader_prefill():
    s = Scheduler(cfg(max_num_tokens=20))
    r = FakeRunner(s)
    prompt = list(range(40, 56))  # 16 tokens, 4 blocks
    lead = mk("l", prompt, max_tokens=2)
    sibs = [mk(f"s{i}", prompt, max_tokens=2, leader=lead) for i in range(2)]
    other = mk("x", [7, 7, 7, 7, 7], max_tokens=2)
    for q in [lead, *sibs, other]:
        s.add_request(q)
    out, _ = r.step()
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("l", 16), ("x", 4)]
    assert all(q.status == RequestStatus.WAITING for q in sibs)
    out, _ = r.step()
    ids = [c.request.request_id for c in out.chunks]
    assert "s0" in ids and "s1" in ids
    for q in sibs:
        assert q.num_cached_tokens == 12  # whole prompt cached; last block recomputed
    r.run()
    for q in sibs:
        assert q.output_token_ids == lead.output_token_ids
    assert_all_free(s)


def test_siblings_gated_while_leader_waits():
    s = Scheduler(cfg(max_num_seqs=1))
    r = FakeRunner(s)
    blocker = mk("blk", [1, 2], max_tokens=3, ignore_eos=True)
    s.add_request(blocker)
    r.step()
    lead = mk("l", range(8), max_tokens=1)
    sib = mk("s", range(8), max_tokens=1, leader=lead)
    s.add_request(lead)
    s.add_request(sib)
    order = []
    while s.has_unfinished:
        out, _ = r.step()
        order += [c.request.request_id for c in out.chunks if c.start == 0 or c.request is sib]
    assert order.index("l") < order.index("s")
    assert sib.num_cached_tokens == 4


# ---------------------------------------------------------------- stops
def test_stop_conditions():
    s = Scheduler(cfg())
    r = FakeRunner(s)
    prompt = [11, 12, 13]
    t1 = next_token(prompt)
    a = mk("a", prompt, max_tokens=5, stop_token_ids=(t1,))
    b = mk("b", prompt, max_tokens=5, stop_token_ids=(t1,), min_tokens=2)
    c = mk("c", prompt, max_tokens=3)
    for q in (a, b, c):
        s.add_request(q)
    r.run()
    assert a.finish_reason == FinishReason.STOP and a.stop_reason == t1 and a.output_token_ids == [t1]
    assert b.num_output_tokens >= 2 and b.output_token_ids == reference_output(prompt, b.params, 256)
    assert c.finish_reason == FinishReason.LENGTH and c.num_output_tokens == 3
    # EOS, and ignore_eos.
    s2 = Scheduler(cfg())
    r2 = FakeRunner(s2, eos_mod=1)  # every token is EOS
    d = mk("d", prompt, max_tokens=4)
    e = mk("e", prompt, max_tokens=4, ignore_eos=True)
    s2.add_request(d)
    s2.add_request(e)
    r2.run()
    assert d.finish_reason == FinishReason.STOP and d.stop_reason is None and d.output_token_ids == [EOS]
    assert e.finish_reason == FinishReason.LENGTH and e.output_token_ids == [EOS] * 4


def test_finish_with_stop_string():
    s = Scheduler(cfg())
    r = FakeRunner(s)
    a = mk("a", [1, 2, 3], max_tokens=10, ignore_eos=True)
    s.add_request(a)
    r.step()
    assert s.finish("a", FinishReason.STOP, "\n\n") is a
    assert a.stop_reason == "\n\n" and a.finish_reason == FinishReason.STOP
    assert s.finish("a", FinishReason.STOP) is None and s.abort("nope") is None
    assert_all_free(s)


# ---------------------------------------------------------------- aborts
def _abort_and_check(s, q):
    assert s.abort(q.request_id) is q
    assert q.status == RequestStatus.FINISHED and q.finish_reason == FinishReason.ABORT
    assert q.block_ids == []
    assert s.abort(q.request_id) is None


def test_abort_everywhere():
    s = Scheduler(cfg(max_num_tokens=8, block_size=2, num_blocks=40, max_seq_len=64))
    r = FakeRunner(s)
    dec = mk("dec", [1, 2], max_tokens=30, ignore_eos=True)
    pre = mk("pre", range(10, 30), max_tokens=2)
    wait = mk("wait", [5], max_tokens=2)
    for q in (dec, pre, wait):
        s.add_request(q)
    r.step()  # dec prefills (2), pre gets 6 of 20
    _abort_and_check(s, wait) if wait.status == RequestStatus.WAITING else None
    r.step()
    assert dec.num_uncomputed_tokens == 1 and 0 < pre.num_computed_tokens < 20
    _abort_and_check(s, pre)  # mid-prefill
    r.step()
    _abort_and_check(s, dec)  # decoding
    assert_all_free(s)
    # Preempted.
    s = Scheduler(cfg(block_size=2, num_blocks=7, max_seq_len=64))
    r = FakeRunner(s)
    a = mk("a", [1, 2, 3, 4], max_tokens=7, ignore_eos=True)
    b = mk("b", [9, 8, 7, 6], max_tokens=7, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    while b.status != RequestStatus.PREEMPTED:
        r.step()
    _abort_and_check(s, b)
    r.run()
    assert_all_free(s)


def test_abort_between_schedule_and_update():
    s = Scheduler(cfg())
    r = FakeRunner(s)
    a = mk("a", [1, 2, 3], max_tokens=5)
    b = mk("b", [4, 5, 6], max_tokens=1)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    sampled = r.execute(out)
    s.abort("a")
    finished = s.update(out, sampled)
    assert finished == [b] and a.num_output_tokens == 0
    assert_all_free(s)


# ---------------------------------------------------------------- property test
req_spec = st.tuples(
    st.integers(0, 3),  # prefix index (3: none)
    st.lists(st.integers(0, 99), max_size=6),  # tail
    st.integers(1, 8),  # max_tokens
    st.integers(0, 2),  # priority
    st.integers(1, 3),  # n
)
event = st.tuples(
    st.lists(req_spec, max_size=2),  # arrivals
    st.integers(0, 199),  # abort before the step (when < 40)
    st.integers(0, 199),  # finish() before the step (when < 40)
    st.integers(0, 199),  # abort between schedule and update (when < 20)
)


def check_invariants(s: Scheduler):
    pool, bs = s.kv.pool, s.config.block_size
    owners: dict[int, int] = {}
    for q in s.running:
        assert q.status == RequestStatus.RUNNING
        assert len(q.block_ids) * bs >= q.num_computed_tokens
        for b in q.block_ids:
            owners[b] = owners.get(b, 0) + 1
    for q in s.waiting:
        assert q.block_ids == [] and q.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert q.num_computed_tokens == 0
    for b in range(1, pool.num_blocks):
        assert pool.ref_count(b) == owners.get(b, 0)
        if owners.get(b, 0) > 1:
            assert pool.block_hash(b) is not None, "block shared but not a cached block"
        assert pool.is_free(b) == (b not in owners)
    assert pool.num_free + len(owners) == pool.num_usable
    assert len(s.running) + len(s.waiting) == len(s.requests)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bs=st.sampled_from([1, 2, 4]),
    num_blocks=st.integers(4, 24),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 5),
    max_seq_len=st.integers(8, 48),
    caching=st.booleans(),
    eos_mod=st.sampled_from([0, 7, 13]),
    prefixes=st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=9), min_size=3, max_size=3),
    events=st.lists(event, min_size=1, max_size=30),
)
def test_random_workload(bs, num_blocks, budget, max_seqs, max_seq_len, caching, eos_mod, prefixes, events):
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_tokens=budget, max_seq_len=max_seq_len,
                             block_size=bs, num_blocks=num_blocks, enable_prefix_caching=caching)
    s = Scheduler(config)
    r = FakeRunner(s, eos_mod=eos_mod)
    accepted: list[Request] = []
    externally_ended: set[str] = set()
    next_id = 0

    def pick(i):
        live = sorted(s.requests)
        return live[i % len(live)] if live else None

    def step(mid_abort=None):
        had_work = s.has_unfinished
        out = s.schedule()
        assert out.num_batched_tokens <= budget and len(s.running) <= max_seqs
        assert len({id(c.request) for c in out.chunks}) == len(out.chunks)
        assert all(c.request.status == RequestStatus.RUNNING for c in out.chunks)
        assert all(p.status == RequestStatus.PREEMPTED for p in out.preempted)
        assert not had_work or out.chunks, "unfinished requests but nothing scheduled"
        check_invariants(s)
        sampled = r.execute(out)
        if mid_abort is not None and mid_abort < 20 and (rid := pick(mid_abort)):
            s.abort(rid)
            externally_ended.add(rid)
        s.update(out, sampled)
        check_invariants(s)
        assert all(q.num_uncomputed_tokens >= 1 for q in s.running)

    for arrivals, abort_i, finish_i, mid_i in events:
        for pidx, tail, max_tokens, prio, n in arrivals:
            prompt = (prefixes[pidx] if pidx < 3 else []) + tail
            leader = None
            for k in range(n):
                q = Request(f"r{next_id}", list(prompt), SamplingParams(max_tokens=max_tokens, priority=prio),
                            prefill_leader=leader, eos_token_ids=(EOS,))
                next_id += 1
                try:
                    s.add_request(q)
                except RequestError:
                    total = len(prompt) + max_tokens
                    assert not prompt or total > max_seq_len or -(-total // bs) > num_blocks - 1
                    assert q.request_id not in s.requests
                    break
                accepted.append(q)
                leader = leader or q
        if abort_i < 40 and (rid := pick(abort_i)):
            assert s.abort(rid).finish_reason == FinishReason.ABORT
            externally_ended.add(rid)
        if finish_i < 40 and (rid := pick(finish_i)):
            assert s.finish(rid, FinishReason.STOP, "stop-string").stop_reason == "stop-string"
            externally_ended.add(rid)
        step(mid_i)

    for _ in range(20000):
        if not s.has_unfinished:
            break
        step()
    assert_all_free(s)
    for q in accepted:
        assert q.is_finished
        ref = reference_output(q.prompt_token_ids, q.params, max_seq_len, eos_mod)
        if q.request_id in externally_ended:
            assert q.output_token_ids == ref[: q.num_output_tokens]
        else:
            assert q.output_token_ids == ref
            assert q.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)

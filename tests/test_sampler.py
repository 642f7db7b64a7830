"""Batched sampler: greedy, seeded determinism, distribution, filters, penalties, logprobs."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch

from kiln.engine.request import Request
from kiln.engine.sampler import Sampler, uniform_noise, unit_interval
from kiln.engine.sampling_metadata import SamplingMetadata, row_keys
from kiln.sampling_params import SamplingParams

V = 64
sampler = Sampler()


def req(seed=0, prompt=(1, 2, 3), out=(), eos=(), **kw) -> Request:
    r = Request(request_id=f"r{seed}", prompt_token_ids=list(prompt), params=SamplingParams(**kw),
                seed=seed, eos_token_ids=tuple(eos))
    r.output_token_ids = list(out)
    return r


def sample(rows, logits):
    meta = SamplingMetadata.build(rows, logits.shape[-1], "cpu")
    return sampler(logits, meta)


def rand_logits(b, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * 3


def test_no_host_sync_calls_in_sampler():
    root = pathlib.Path(__file__).resolve().parents[1] / "kiln" / "engine"
    for name in ("sampler.py",):
        src = (root / name).read_text()
        for bad in (".item(", ".tolist(", ".cpu(", ".numpy(", "torch.multinomial"):
            assert bad not in src, f"{name} uses {bad}"
        assert not re.search(r"\bif\s+[^:]*\.any\(\)", src)


def test_greedy_is_argmax():
    logits = rand_logits(5)
    rows = [req(seed=i, temperature=0.0) for i in range(4)] + [req(seed=9, top_k=1)]
    out = sample(rows, logits)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64


def test_noise_is_uniform_and_deterministic():
    seeds = torch.tensor([0, 1, 2**62 + 5], dtype=torch.int64)
    steps = torch.tensor([0, 7, 3], dtype=torch.int64)
    u = uniform_noise(seeds, steps, 20000)
    assert torch.equal(u, uniform_noise(seeds, steps, 20000))
    assert u.min() > 0 and u.max() < 1
    for row in u:
        assert abs(row.mean().item() - 0.5) < 0.01
    # Rows differ from one another.
    assert (u[0] != u[1]).float().mean() > 0.99
    # Host-side (Python int) keys equal the tensor computation bit for bit.
    k1, k2 = row_keys(seeds, steps)
    for i in range(3):
        assert (k1[i].item(), k2[i].item()) == row_keys(int(seeds[i]), int(steps[i]))


def test_noise_never_reaches_0_or_1():
    # Every 32-bit hash maps strictly inside (0, 1), so the Gumbel noise is finite: a U of exactly
    # 1 would give +inf and pick a token the filters had removed. Check the extremes of the range.
    h = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 512, 2**32 - 2, 2**32 - 1],
                     dtype=torch.int64)
    u = unit_interval(h)
    assert u.dtype == torch.float32 and u.min() > 0 and u.max() < 1
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    assert u[-1].item() == 1 - 2**-24 and u[0].item() == 2**-24


MIXED = [
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.0),
    dict(temperature=1.0, min_p=0.1, repetition_penalty=1.3),
    dict(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.3, logprobs=5),
    dict(temperature=1.0, min_tokens=3, max_tokens=8),
]


def test_row_alone_equals_row_in_batch():
    logits = rand_logits(len(MIXED), seed=3)
    rows = [req(seed=100 + i, out=[5, 6, 5], eos=(7,), **kw) for i, kw in enumerate(MIXED)]
    batched = sample(rows, logits)
    for i, r in enumerate(rows):
        alone = sample([r], logits[i:i + 1])
        assert alone.token_ids[0] == batched.token_ids[i]
        assert torch.allclose(alone.logprobs[0], batched.logprobs[i])
    # Reversed order, too.
    rev = sample(rows[::-1], logits.flip(0))
    assert torch.equal(rev.token_ids.flip(0), batched.token_ids)


def test_seed_determinism():
    logits = torch.zeros(1, 1000)
    a = [sample([req(seed=42, out=[0] * s)], logits).token_ids.item() for s in range(50)]
    b = [sample([req(seed=42, out=[0] * s)], logits).token_ids.item() for s in range(50)]
    c = [sample([req(seed=43, out=[0] * s)], logits).token_ids.item() for s in range(50)]
    assert a == b
    assert sum(x == y for x, y in zip(a, c)) < 5
    assert len(set(a)) > 40  # different steps give different draws


@pytest.mark.parametrize("kw", [{}, dict(top_k=3), dict(top_p=0.6), dict(temperature=0.5),
                                dict(min_p=0.4, temperature=1.0)])
def test_empirical_distribution_matches(kw):
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    logits = probs.log()
    expected = probs.clone()
    if kw.get("top_k") or kw.get("top_p") or kw.get("min_p"):
        expected[3:] = 0  # each of these settings keeps exactly the top 3 here
    if "temperature" in kw:
        expected = expected ** (1 / kw["temperature"])
    expected = expected / expected.sum()
    n = 20000
    # Many rows with distinct seeds and steps: each row is an independent draw.
    rows = [req(seed=i // 4, out=[0] * (i % 4), **kw) for i in range(n)]
    meta = SamplingMetadata.build(rows, 8, "cpu")
    out = sampler(logits.expand(n, 8).contiguous(), meta)
    freq = torch.bincount(out.token_ids, minlength=8).float() / n
    assert (freq - expected).abs().max() < 0.02
    keep = expected > 0
    assert freq[~keep].sum() == 0
    chi2 = (((freq - expected)[keep] ** 2) / expected[keep]).sum().item() * n
    assert chi2 < 24.3  # <= 7 dof, p = 0.001


def ref_filter(row_logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Straightforward per-row reference: bool mask of tokens allowed to be drawn."""
    x = row_logits / p.temperature
    allowed = torch.ones_like(x, dtype=torch.bool)
    vals = sorted(x.tolist(), reverse=True)
    if p.top_k > 0:
        allowed &= x >= vals[p.top_k - 1]
    if p.top_p < 1.0:
        xm = x.masked_fill(~allowed, float("-inf"))
        pr = torch.softmax(xm, -1).tolist()
        order = sorted(range(len(pr)), key=lambda i: -pr[i])
        acc, keep = 0.0, set()
        for i in order:
            if acc >= p.top_p and keep:
                break
            keep.add(i)
            acc += pr[i]
        allowed &= torch.tensor([i in keep for i in range(len(pr))])
    if p.min_p > 0:
        pr = torch.softmax(x.masked_fill(~allowed, float("-inf")), -1)
        allowed &= pr >= p.min_p * pr.max()
    return allowed


@pytest.mark.parametrize("kw", [
    dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=8, top_p=0.7, temperature=0.6),
    dict(top_p=0.9, min_p=0.05, temperature=1.5), dict(top_k=3, min_p=0.5),
])
def test_filters_match_reference(kw):
    logits = rand_logits(200, seed=11)
    rows = [req(seed=1000 + i, **kw) for i in range(200)]
    out = sample(rows, logits)
    for i in range(200):
        allowed = ref_filter(logits[i], rows[i].params)
        assert allowed[out.token_ids[i]], (i, kw)
    # Same logits row, many draws: the set of drawn tokens equals the allowed set.
    one = logits[:1].expand(3000, V).contiguous()
    rows = [req(seed=i, **kw) for i in range(3000)]
    drawn = set(sample(rows, one).token_ids.tolist())
    allowed = set(torch.nonzero(ref_filter(logits[0], rows[0].params)).flatten().tolist())
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 2) or len(allowed) == 1


def test_top_k_in_batch_with_disabled_rows():
    logits = rand_logits(3, seed=5)
    rows = [req(seed=1, top_k=2), req(seed=2), req(seed=3, top_k=40)]
    for s in range(30):
        for r in rows:
            r.output_token_ids = [0] * s
        out = sample(rows, logits)
        assert out.token_ids[0] in logits[0].topk(2).indices


def ref_penalties(logits: torch.Tensor, r: Request) -> torch.Tensor:
    x = logits.clone()
    p = r.params
    seen = set(r.prompt_token_ids) | set(r.output_token_ids)
    for t in seen:
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(r.output_token_ids):
        c = r.output_token_ids.count(t)
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    return x


def test_penalties_match_reference():
    from kiln.engine.sampler import apply_penalties

    logits = rand_logits(4, seed=8)
    rows = [
        req(seed=0, prompt=[1, 2, 3, 3], out=[4, 4, 5], repetition_penalty=1.5),
        req(seed=1, prompt=[9], out=[4, 4, 5, 9, 9, 9], presence_penalty=0.7, frequency_penalty=-0.4),
        req(seed=2, prompt=[10, 11], out=[10, 12, 12], repetition_penalty=0.8, frequency_penalty=1.0),
        req(seed=3, prompt=[1], out=[1, 1]),
    ]
    meta = SamplingMetadata.build(rows, V, "cpu")
    got = apply_penalties(logits, meta)
    for i, r in enumerate(rows):
        assert torch.allclose(got[i], ref_penalties(logits[i], r), atol=1e-6), i
    # Greedy with penalties picks the argmax of the penalized logits.
    greedy = [req(seed=0, prompt=[int(logits[0].argmax())], temperature=0.0, repetition_penalty=2.0)]
    exp = ref_penalties(logits[0], greedy[0]).argmax()
    assert sample(greedy, logits[:1]).token_ids[0] == exp


def test_min_tokens_suppresses_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 7] = 50.0  # eos
    logits[0, 9] = 40.0  # stop token id
    kw = dict(temperature=0.0, min_tokens=2, max_tokens=5, stop_token_ids=(9,))
    assert sample([req(out=[], eos=(7,), **kw)], logits).token_ids[0] not in (7, 9)
    assert sample([req(out=[1], eos=(7,), **kw)], logits).token_ids[0] not in (7, 9)
    assert sample([req(out=[1, 1], eos=(7,), **kw)], logits).token_ids[0] == 7
    # Sampled rows too.
    rows = [req(seed=s, out=[], eos=(7,), temperature=1.0, min_tokens=1) for s in range(200)]
    assert 7 not in sample(rows, logits.expand(200, V).contiguous()).token_ids.tolist()
    # ignore_eos: EOS is not a stop, so it is not suppressed.
    r = req(out=[], eos=(7,), temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sample([r], logits).token_ids[0] == 7


def test_logprobs_are_raw_and_top_k_true():
    logits = rand_logits(3, seed=21)
    rows = [req(seed=1, logprobs=3, temperature=0.5, top_k=4, repetition_penalty=1.7),
            req(seed=2, logprobs=0, temperature=0.0),
            req(seed=3, logprobs=5, top_p=0.5)]
    out = sample(rows, logits)
    ls = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ls.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == (3, 5) and out.top_logprobs.shape == (3, 5)
    exp_lp, exp_ids = ls.topk(5, -1)
    assert torch.equal(out.top_ids, exp_ids)
    assert torch.allclose(out.top_logprobs, exp_lp)
    none = sample([req(seed=1)], logits[:1])
    assert none.top_ids is None and none.top_logprobs is None
    assert math.isfinite(none.logprobs[0].item())


def test_bf16_logits_and_input_not_modified():
    logits = rand_logits(2, seed=4)
    before = logits.clone()
    rows = [req(seed=1, repetition_penalty=1.5, out=[1, 2]), req(seed=2, min_tokens=1, eos=(3,))]
    sample(rows, logits)
    assert torch.equal(logits, before)
    out = sample(rows, logits.to(torch.bfloat16))
    assert out.token_ids.shape == (2,)


def test_plain_greedy_only_when_the_argmax_is_the_whole_answer():
    """The CUDA-graph decode takes its tokens from the graph's argmax when `plain_greedy` says so:
    it must refuse every row that needs the sampler (sampling, logprobs, penalties, suppression)."""
    from kiln.engine.sampling_metadata import plain_greedy

    def req(**kw):
        r = Request("r", [1, 2, 3], SamplingParams(max_tokens=8, **kw))
        r.eos_token_ids = (2,)
        return r

    assert plain_greedy([req(temperature=0.0), req(top_k=1)], 50)
    assert not plain_greedy([req(temperature=0.0), req(temperature=0.7)], 50)
    assert not plain_greedy([req(temperature=0.0, logprobs=0)], 50)
    assert not plain_greedy([req(temperature=0.0, repetition_penalty=1.2)], 50)
    assert not plain_greedy([req(temperature=0.0, presence_penalty=0.5)], 50)
    early = req(temperature=0.0, min_tokens=2)
    assert not plain_greedy([early], 50)  # EOS is suppressed for its first 2 tokens
    early.output_token_ids.extend([5, 6])
    assert plain_greedy([early], 50)

"""Greedy output of a prompt does not depend on what else the engine is doing.

On the real default model: alone; batched with 7 other prompts; with preemption forced by a tiny KV
pool; with chunked prefill forced by a tiny token budget; after a prefix-cache hit; with n = 3.
"""

from __future__ import annotations

import pytest

from kiln.llm import LLM
from kiln.sampling_params import SamplingParams

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
OTHERS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "My favourite book is a long story about a dragon and",
    "In 1969, the first humans",
    "Bonjour, je m'appelle Marie et",
    "A list of fruits: apple, banana,",
]
N_TOKENS = 24
GREEDY = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(default_engine):
    llm = LLM(default_engine, device="cpu", skip_verify=True)
    return llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids


def run(engine, prompts, params=GREEDY, **options):
    llm = LLM(engine, device="cpu", skip_verify=True, **options)
    outs = llm.generate(prompts, params)
    stats = llm.core.scheduler.stats()
    assert stats["free_blocks"] == stats["total_blocks"], "blocks leaked"
    return llm, outs


def test_alone_is_deterministic(default_engine, reference):
    _, outs = run(default_engine, PROMPT)
    assert outs[0].outputs[0].token_ids == reference
    assert len(reference) == N_TOKENS


def test_in_a_batch_of_eight(default_engine, reference):
    _, outs = run(default_engine, OTHERS[:3] + [PROMPT] + OTHERS[3:])
    assert outs[3].outputs[0].token_ids == reference


def test_with_preemption(default_engine, reference):
    # 8 sequences of ~45 tokens need ~24 blocks of 16; a pool of 10 blocks forces preemption.
    llm, outs = run(default_engine, [PROMPT] + OTHERS, kv_cache_memory=10 * 16 * 46080 + 1)
    assert outs[0].outputs[0].token_ids == reference
    assert sum(o.outputs[0].metrics.num_preemptions for o in outs) > 0, "no preemption happened"
    for o, p in zip(outs[1:], OTHERS):  # every preempted request still equals its solo run
        assert o.outputs[0].token_ids == run(default_engine, p)[1][0].outputs[0].token_ids


def test_with_chunked_prefill(default_engine, reference):
    llm, outs = run(default_engine, [PROMPT] + OTHERS[:3], max_num_tokens=8)
    assert outs[0].outputs[0].token_ids == reference
    assert len(outs[0].prompt_token_ids) > 8  # the prompt needed several chunks


def test_with_prefix_cache_hit(default_engine, reference):
    llm = LLM(default_engine, device="cpu", skip_verify=True)
    llm.generate(PROMPT + " loved", SamplingParams(max_tokens=2, temperature=0.0))
    out = llm.generate(PROMPT, GREEDY)[0].outputs[0]
    assert out.metrics.num_cached_tokens >= 16
    assert out.token_ids == reference


def test_with_n_3(default_engine, reference):
    _, outs = run(default_engine, PROMPT, SamplingParams(max_tokens=N_TOKENS, temperature=0.0,
                                                          ignore_eos=True, n=3))
    assert [c.token_ids for c in outs[0].outputs] == [reference] * 3
    assert sum(c.metrics.num_cached_tokens for c in outs[0].outputs[1:]) > 0, "n>1 shared no blocks"

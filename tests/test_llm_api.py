"""The offline API on the real default model: refusals, abort, seeds, stops, logprobs, timings."""

from __future__ import annotations

import math

import pytest

from kiln.errors import RequestError
from kiln import LLM
from kiln.sampling_params import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(default_engine):
    return LLM(default_engine, device="cpu", skip_verify=True)


def assert_idle(llm: LLM) -> None:
    s = llm.core.scheduler.stats()
    assert (s["running"], s["waiting"]) == (0, 0)
    assert s["free_blocks"] == s["total_blocks"], "KV blocks leaked"


def test_prompt_plus_max_tokens_beyond_context_is_refused(llm):
    n = len(llm.encode_prompt(PROMPT))
    with pytest.raises(RequestError) as e:
        llm.generate(PROMPT, SamplingParams(max_tokens=4096))
    assert e.value.param == "max_tokens"
    assert f"{n} tokens" in str(e.value) and "4096" in str(e.value)
    assert_idle(llm)


def test_prompt_alone_beyond_context_is_refused(llm):
    with pytest.raises(RequestError) as e:
        llm.generate([5] * 4096, SamplingParams(max_tokens=1))
    assert e.value.param == "prompt" and "4096" in str(e.value)
    assert_idle(llm)


def test_request_larger_than_the_whole_kv_pool_is_refused(default_engine):
    small = LLM(default_engine, device="cpu", skip_verify=True, kv_cache_memory=8 * 16 * 46080)
    usable = small.core.scheduler.stats()["total_blocks"]
    with pytest.raises(RequestError) as e:
        small.generate([5] * 200, SamplingParams(max_tokens=100))
    msg = str(e.value)
    assert "19" in msg and str(usable) in msg, msg  # 300 tokens need 19 blocks of 16
    assert small.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
    assert_idle(small)


@pytest.mark.parametrize("prompt, param, words", [
    ("", "prompt", "empty"),
    ([1, 2, 49152], "prompt", "49152"),
    ([-1], "prompt", "-1"),
])
def test_bad_prompts_are_refused(llm, prompt, param, words):
    with pytest.raises(RequestError) as e:
        llm.generate(prompt, SamplingParams(max_tokens=2))
    assert e.value.param == param and words in str(e.value)
    assert_idle(llm)


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=2.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
    (dict(n=17), "n"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(stop=["ok", ""]), "stop"),
    (dict(min_p=1.5), "min_p"), (dict(logprobs=21), "logprobs"),
])
def test_bad_sampling_params_name_the_param(kwargs, param):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_abort_at_any_point_frees_every_block(default_engine):
    llm = LLM(default_engine, device="cpu", skip_verify=True, max_num_seqs=2, max_num_tokens=8)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ids = [llm.add_request(llm.encode_prompt(p), params)[0]
           for p in [PROMPT, "One two three four five six seven eight nine ten", "Hello"]]
    llm.processor.process(llm.core.step())  # first chunk of prompt 1, 2 still prefilling
    llm.abort(ids[1])  # mid-prefill (its 10+ token prompt needs two 8-token chunks)
    llm.abort(ids[2])  # still waiting
    for _ in range(5):
        llm.processor.process(llm.core.step())
    llm.abort(ids[0])  # mid-decode
    assert not llm.core.has_unfinished()
    assert [llm.processor.result(i).finish_reason for i in ids] == ["abort"] * 3
    assert_idle(llm)


def test_seeded_sampling_is_independent_of_the_batch(llm):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPT, p)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0, seed=s, top_k=5) for s in range(3)]
    batch = llm.generate(["Hi", PROMPT, "Why is the sky blue?", "Count: 1, 2,"],
                         [others[0], p, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate(PROMPT, SamplingParams(**{**p.__dict__, "seed": 99}))[0]
    assert other_seed.outputs[0].token_ids != alone
    assert_idle(llm)


def test_n_choices_differ_when_sampling(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_is_not_emitted(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    assert "Paris" in greedy.text
    out = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, stop=["aris"]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == "aris"
    assert c.text == greedy.text[: greedy.text.index("aris")]
    assert_idle(llm)


def test_stop_token_ids_and_length(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    stop_id = greedy.token_ids[2]
    c = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0,
                                            stop_token_ids=[stop_id]))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == greedy.token_ids[:3]
    c = llm.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3


def test_min_tokens_holds_off_eos(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    short = llm.chat(chat, SamplingParams(max_tokens=64, temperature=0))[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 30
    longer = llm.chat(chat, SamplingParams(max_tokens=64, temperature=0, min_tokens=40))[0].outputs[0]
    assert len(longer.token_ids) >= 40


def test_logprobs_and_timings(llm):
    c = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 6
    for lp, tok in zip(c.logprobs, c.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the most likely token
        assert math.isclose(lp.top[0][1], lp.logprob, abs_tol=1e-5)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-5
    m = c.metrics
    assert m.ttft is not None and 0 < m.ttft <= m.e2e
    assert m.num_prompt_tokens == len(llm.encode_prompt(PROMPT))


def test_chat_uses_the_models_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=20, temperature=0))[0]
    assert "Paris" in out.outputs[0].text
    text = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")

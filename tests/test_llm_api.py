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
    # wrong types are refused when the params are made, never inside a step
    (dict(top_k=2.5), "top_k"), (dict(logprobs=1.5), "logprobs"), (dict(n=2.5), "n"),
    (dict(priority=None), "priority"), (dict(max_tokens=True), "max_tokens"), (dict(stop=[5]), "stop"),
    (dict(temperature="1"), "temperature"), (dict(seed=1.0), "seed"), (dict(ignore_eos=1), "ignore_eos"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop=["x"] * 33), "stop"),
])
def test_bad_sampling_params_name_the_param(kwargs, param):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_refused_prompt_in_a_list_leaves_nothing_queued(llm):
    with pytest.raises(RequestError) as e:
        llm.generate([PROMPT, [5] * 4096], SamplingParams(max_tokens=2))
    assert e.value.param == "prompt"
    assert_idle(llm)
    assert not llm.core.has_unfinished() and llm.processor.num_tracked == 0 and llm.num_unfinished == 0
    out = llm.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("call, words", [
    (lambda llm: llm.generate([]), "no prompts"),
    (lambda llm: llm.generate([1.7]), "integer token ids"),
    (lambda llm: llm.generate([[1, 2], [True]]), "integer token ids"),
    (lambda llm: llm.generate(PROMPT, "greedy"), "SamplingParams"),
    (lambda llm: llm.chat([]), "non-empty"),
    (lambda llm: llm.chat([[]]), "non-empty"),
    (lambda llm: llm.chat([{"role": "user", "content": None}]), "content must be a string"),
])
def test_malformed_calls_are_refused(llm, call, words):
    with pytest.raises(RequestError) as e:
        call(llm)
    assert words in str(e.value)
    assert_idle(llm)


def test_array_prompts_are_accepted(llm):
    import numpy as np

    ids = llm.encode_prompt(PROMPT)
    want = llm.generate(ids, SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids
    got = llm.generate(np.array(ids), SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids
    assert got == want


def test_abort_by_request_id_ends_every_choice(llm):
    choices = llm.add_request(llm.encode_prompt(PROMPT),
                              SamplingParams(n=3, max_tokens=20, temperature=1.0, seed=3, ignore_eos=True),
                              request_id="grp")
    assert choices == ["grp-0", "grp-1", "grp-2"]
    stream = llm.stream()
    next(stream)
    llm.abort("grp")
    finals = {d.request_id: d.finish_reason for d in stream if d.finish_reason is not None}
    assert finals == {c: "abort" for c in choices}
    assert_idle(llm)
    assert llm.processor.num_tracked == 0 and llm.num_unfinished == 0


def test_streaming_keeps_nothing_after_the_last_delta(llm):
    for i in range(3):
        llm.add_request(llm.encode_prompt(PROMPT), SamplingParams(max_tokens=2, n=2, seed=i))
    finals = [d for d in llm.stream() if d.finish_reason is not None]
    assert len(finals) == 6 and all(d.output is not None for d in finals)
    assert llm.processor.num_tracked == 0 and llm.num_unfinished == 0


def test_generate_refuses_while_streamed_requests_run(llm):
    llm.add_request(llm.encode_prompt(PROMPT), SamplingParams(max_tokens=2), request_id="busy")
    with pytest.raises(RequestError) as e:
        llm.generate(PROMPT)
    assert "idle" in str(e.value)
    assert [d.finish_reason for d in llm.stream()][-1] == "length"
    assert_idle(llm)


def test_tiny_temperature_is_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].token_ids
    for t in (1e-38, 1e-7):
        out = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=t, seed=0))
        assert out[0].outputs[0].token_ids == greedy


def test_abort_at_any_point_frees_every_block(default_engine):
    llm = LLM(default_engine, device="cpu", skip_verify=True, max_num_seqs=2, max_num_tokens=8)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ids = [llm.add_request(llm.encode_prompt(p), params)[0]
           for p in [PROMPT, "One two three four five six seven eight nine ten", "Hello"]]
    stream = llm.stream()
    deltas = [next(stream)]  # first chunk of prompt 1, 2 still prefilling
    llm.abort(ids[1])  # mid-prefill (its 10+ token prompt needs two 8-token chunks)
    llm.abort(ids[2])  # still waiting
    for _ in range(5):
        deltas.append(next(stream))
    llm.abort(ids[0])  # mid-decode
    deltas += list(stream)
    assert not llm.core.has_unfinished()
    finals = {d.request_id: d for d in deltas if d.finish_reason is not None}
    assert {i: finals[i].finish_reason for i in ids} == {i: "abort" for i in ids}
    assert len(finals[ids[0]].output.token_ids) >= 1 and finals[ids[2]].output.token_ids == []
    assert_idle(llm)
    assert llm.processor.num_tracked == 0 and llm.num_unfinished == 0


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
    assert out.prompt == text  # the rendered prompt is returned

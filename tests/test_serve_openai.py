"""The real `openai` client against a real `kiln serve` process.

References: the offline engine (`LLM`, itself checked against transformers in
test_default_model.py) for tokens, text and logprobs; transformers' tokenizer for the usage counts.
"""

from __future__ import annotations

import math

import pytest
from conftest_tokenizer import hf_tokenizer  # noqa: F401  (fixture)
from openai import OpenAI
from serve_helpers import MODEL

from kiln import LLM, SamplingParams

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(default_engine):
    return LLM(default_engine, device="cpu", skip_verify=True)


def test_chat_matches_the_offline_engine_and_tokenizer_counts(client, llm, hf_tokenizer):  # noqa: F811
    ref = llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=0, logprobs=3))[0].outputs[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                       logprobs=True, top_logprobs=3)
    (c,) = r.choices
    assert c.message.role == "assistant" and c.message.content == ref.text
    assert c.finish_reason == ref.finish_reason
    text = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # logprobs: the offline engine's numbers, token texts that spell the answer, 3 alternatives
    lps = c.logprobs.content
    assert [x.logprob for x in lps] == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    for x, t in zip(lps, ref.logprobs):
        assert len(x.top_logprobs) == 3 and x.top_logprobs[0].logprob == pytest.approx(x.logprob, abs=1e-4)
        assert [a.logprob for a in x.top_logprobs] == pytest.approx([v for _, v in t.top], abs=1e-4)
        assert bytes(x.bytes).decode() == x.token
        assert x.logprob <= 0 and math.isfinite(x.logprob)


def test_chat_stream_gives_the_same_text_and_usage(client, llm):
    ref = llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


def test_completions_plain_stream_echo_and_batch(client, llm, hf_tokenizer):  # noqa: F811
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(hf_tokenizer(PROMPT)["input_ids"])
    assert r.usage.completion_tokens == 16
    s = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in s) == ref.text
    e = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert e.choices[0].text == PROMPT + ref.text
    # a batch of prompts, token ids among them: choices in prompt order
    ids = llm.encode_prompt("Once upon a time")
    ref2 = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    b = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in b.choices] == [0, 1]
    assert [c.text for c in b.choices] == [ref2.text, ref2.text]
    assert b.usage.prompt_tokens == 2 * len(ids) and b.usage.completion_tokens == 16


def test_completion_logprobs(client, llm):
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=2,
                                              ignore_eos=True))[0].outputs[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-4)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_n_seed_and_stop(client, llm):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=1.0, n=2, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    c = client.chat.completions.create(**{**kw, "seed": 99})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]
    # stop: the offline greedy text, cut where the stop string starts
    ref = llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    stop = ref[4:9]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].message.content == ref[: ref.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=stop,
                                       stream=True)
    chunks = list(s)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref[: ref.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_and_extensions(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    # extension fields pass through: min_tokens with a stop token id that would end at once
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                  extra_body={"min_tokens": 5, "top_k": 1, "repetition_penalty": 1.1,
                                              "min_p": 0.05, "priority": 1, "stop_token_ids": [2]})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"

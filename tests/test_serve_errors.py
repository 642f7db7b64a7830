"""Every refusal of section 4 against the real server: status, OpenAI error shape, `param`."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import MODEL

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = None, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert "Traceback" not in r.text and ".py" not in r.text and "/work" not in r.text
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err
    assert r.headers.get("x-request-id")
    return err


SAMPLING_CASES = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"n": "two"}, "n"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
]


@pytest.mark.parametrize("extra,param", SAMPLING_CASES, ids=[json.dumps(c[0]) for c in SAMPLING_CASES])
@pytest.mark.parametrize("route", [CHAT, COMP])
def test_sampling_values_out_of_range(http, route, extra, param):
    body = {"model": MODEL, **({"messages": MSGS} if route == CHAT else {"prompt": "hi"}), **extra}
    assert_error(http.post(route, json=body), 400, param)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_temperature(http, literal):
    raw = '{"model": "%s", "prompt": "hi", "temperature": %s}' % (MODEL, literal)
    r = http.post(COMP, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "temperature")


def test_context_length(http):
    long_prompt = [1] * 4000
    err = assert_error(http.post(COMP, json={"model": MODEL, "prompt": long_prompt, "max_tokens": 200}),
                       400, "max_tokens", "4000", "200", "4096")
    assert "4200" in err["message"]
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": [1] * 5000, "max_tokens": 1}),
                 400, "prompt", "5000", "4096")
    assert_error(http.post(CHAT, json={"model": MODEL, "messages": MSGS, "max_completion_tokens": 5000}),
                 400, "max_completion_tokens", "5000", "4096")
    # the test server's KV pool (64 MiB) holds fewer tokens than the context: refused up front too
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": "hi", "max_tokens": 3000}),
                 400, "max_tokens", "3000", "KV cache")


def test_empty_and_malformed_prompts(http):
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": ""}), 400, "prompt")
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": []}), 400, "prompt")
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": [[]]}), 400, "prompt")
    assert_error(http.post(CHAT, json={"model": MODEL, "messages": []}), 400, "messages")
    assert_error(http.post(CHAT, json={"model": MODEL}), 400, "messages")
    assert_error(http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
                 400, "messages.0.content")
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": [49152]}), 400, "prompt", "49152")
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": [-1]}), 400, "prompt", "-1")
    assert_error(http.post(COMP, json={"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 1}),
                 400, "echo")


def test_bodies_that_are_not_json_objects(http):
    h = {"content-type": "application/json"}
    assert_error(http.post(CHAT, content=b'{"model": ', headers=h), 400, None, "JSON")
    assert_error(http.post(CHAT, content=b"[1, 2]", headers=h), 400, None, "object")
    assert_error(http.post(CHAT, content=b'"text"', headers=h), 400, None, "object")
    assert_error(http.post(CHAT, content=b"", headers=h), 400, None)
    bad_utf8 = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    assert_error(http.post(CHAT, content=bad_utf8, headers=h), 400, None)


def test_unknown_model_route_and_method(http):
    assert_error(http.post(CHAT, json={"model": "gpt-4", "messages": MSGS}), 404, "model", "gpt-4")
    assert_error(http.post(COMP, json={"model": "gpt-4", "prompt": "hi"}), 404, "model")
    assert_error(http.get("/v1/models/gpt-4"), 404, "model")
    assert_error(http.get("/v1/nothing"), 404, None)
    assert_error(http.get(CHAT), 405, None)
    assert_error(http.delete("/v1/models"), 405, None)


def test_body_over_the_limit_is_refused_unread(http):
    big = b'{"prompt": "' + b"a" * (4 << 20) + b'"}'
    assert_error(http.post(COMP, content=big, headers={"content-type": "application/json"}), 413, None)

    def chunks():  # no Content-Length: counted while it is read
        for _ in range(5):
            yield b"a" * (1 << 20)

    assert_error(http.post(COMP, content=chunks(), headers={"content-type": "application/json"}), 413, None)


def test_tokenize_and_detokenize(http):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 0
    d = http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]})
    assert d.status_code == 200 and d.json()["prompt"] == "Hello world"
    assert_error(http.post("/detokenize", json={"tokens": [10**7]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={"model": MODEL}), 400, "prompt")


def test_client_request_id_is_echoed(http):
    r = http.get("/v1/models", headers={"x-request-id": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"
    r = http.post(CHAT, json={"model": MODEL, "messages": []}, headers={"x-request-id": "err-7"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "err-7"
    assert len(http.get("/version").headers["x-request-id"]) == 32  # made up when not given


@pytest.mark.parametrize("route,body,param", [
    (COMP, {"prompt": "\ud800"}, "prompt"),
    (COMP, {"prompt": "hi", "stop": ["\udfff"]}, "stop"),
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
])
def test_lone_surrogates_are_refused_cleanly(http, route, body, param):
    raw = json.dumps({"model": MODEL, **body})  # json escapes the surrogate as \\ud800: valid JSON
    r = http.post(route, content=raw, headers={"content-type": "application/json", "x-request-id": "sur-1"})
    err = assert_error(r, 400, param, "surrogate")
    assert r.headers["x-request-id"] == "sur-1" and err["code"] == "invalid_value"
    assert http.get("/health").status_code == 200  # same keep-alive connection still works


@pytest.mark.parametrize("extra,param", [({"priority": 2**64}, "priority"), ({"top_k": 2**70}, "top_k"),
                                         ({"stop_token_ids": [2**64]}, "stop_token_ids"),
                                         ({"max_tokens": 2**64}, "max_tokens"), ({"seed": -1}, "seed")])
def test_out_of_range_integers(http, extra, param):
    for stream in (False, True):
        assert_error(http.post(COMP, json={"model": MODEL, "prompt": "hi", "stream": stream, **extra}),
                     400, param)


def test_explicit_nulls_mean_defaults(http):
    nulls = {k: None for k in ("n", "presence_penalty", "frequency_penalty", "stream", "top_k", "logprobs",
                               "temperature", "top_p", "stop", "seed", "user", "stream_options", "min_p",
                               "repetition_penalty", "min_tokens", "ignore_eos", "priority", "top_logprobs",
                               "max_completion_tokens", "response_format", "tools", "logit_bias")}
    r = http.post(CHAT, json={"model": MODEL, "messages": MSGS, "max_tokens": 3, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
])
def test_unimplemented_features_are_refused_not_ignored(http, extra, param):
    assert_error(http.post(CHAT, json={"model": MODEL, "messages": MSGS, **extra}), 400, param, "not supported")


def test_long_inputs_do_not_stall_the_server(http, server):
    """Tokenizing or templating big inputs runs off the event loop: /health stays fast meanwhile."""
    import threading
    import time

    import random

    rng = random.Random(0)  # 650 KB of varied text: under the no-tokenize bound, so it gets tokenized
    big_text = " ".join(f"{rng.choice(['kiln', 'clay', 'glaze', 'fire'])}{rng.randrange(10**6)}"
                        for _ in range(55_000))
    many = [{"role": "user", "content": "x"}] * 2048
    jobs = [(COMP, {"model": MODEL, "prompt": big_text}), (CHAT, {"model": MODEL, "messages": many}),
            ("/tokenize", {"model": MODEL, "messages": many}), (COMP, {"model": MODEL, "prompt": "k" * ((4 << 20) - 64)})]
    for route, body in jobs:
        done, worst = threading.Event(), 0.0
        results = []
        t = threading.Thread(target=lambda: (results.append(httpx.post(server.url + route, json=body,
                                                                        headers=server.headers, timeout=60)),
                                             done.set()))
        t.start()
        with httpx.Client(base_url=server.url, timeout=10) as probe:
            while not done.is_set():
                t0 = time.perf_counter()
                assert probe.get("/health").status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                time.sleep(0.01)
        t.join()
        assert results[0].status_code in (200, 400), results[0].text
        assert worst < 0.25, f"{route}: /health took {worst * 1000:.0f} ms"
    assert_error(http.post(CHAT, json={"model": MODEL, "messages": many + many[:1]}), 400, "messages")

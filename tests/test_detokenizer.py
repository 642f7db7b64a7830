"""Incremental detokenizer: clean UTF-8 deltas, exact concatenation, stop strings."""

from __future__ import annotations

import pytest
from conftest_tokenizer import default_tokenizer  # noqa: F401  (fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.engine.detokenizer import DetokDelta, IncrementalDetokenizer
from kiln.sampling_params import SamplingParams

PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"

TEXTS = [
    "The capital of France is Paris. It is lovely.",
    "Emoji: 🙂🚀👩‍👩‍👧 and 🇫🇷 flags!",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Accents: Zürich, Ærøskøbing, naïve café, façade, Łódź, Ελληνικά, русский.",
    "mixed 🙂 日本 é\n\ttabs  and   spaces 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√",
    " leading space",
]


def run(tok, text, stop=(), chunk=1, ids=None, prompt=PROMPT, **kw):
    params = SamplingParams(stop=stop, max_tokens=64, **kw)
    ids = tok.encode(text, add_special_tokens=False) if ids is None else ids
    detok = IncrementalDetokenizer(tok, tok.encode(prompt, add_special_tokens=False), params)
    deltas: list[DetokDelta] = []
    for i in range(0, len(ids), chunk):
        d = detok.add_tokens(ids[i:i + chunk])
        deltas.append(d)
        if d.stop_string is not None:
            break
    else:
        deltas.append(detok.finish())
    return detok, deltas, ids


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_are_clean_and_concatenate(default_tokenizer, text, chunk):
    detok, deltas, ids = run(default_tokenizer, text, chunk=chunk)
    for d in deltas:
        assert isinstance(d.text, str) and "\ufffd" not in d.text
        assert d.stop_string is None
    joined = "".join(d.text for d in deltas)
    assert joined == default_tokenizer.decode(ids) == text
    assert detok.output_text == joined
    # Before finish(), nothing was held back (no stop strings; text complete).
    assert deltas[-1].text == ""


def test_multibyte_tokens_actually_split(default_tokenizer):
    # Sanity: these texts do contain tokens that are partial UTF-8 on their own.
    ids = default_tokenizer.encode("🙂日本", add_special_tokens=False)
    assert any("\ufffd" in default_tokenizer.decode([i]) for i in ids)


def test_stop_string_split_across_tokens(default_tokenizer):
    text = "The capital of France is Paris. It is lovely."
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    pieces = [default_tokenizer.decode([i]) for i in ids]
    assert "Paris." not in pieces  # the stop string spans several tokens
    detok, deltas, _ = run(default_tokenizer, text, stop=("Paris.",))
    assert deltas[-1].stop_string == "Paris."
    joined = "".join(d.text for d in deltas)
    assert joined == "The capital of France is "
    for d in deltas:
        assert "P" not in d.text  # no part of the stop string was ever emitted
    assert detok.finished and detok.finish().text == ""


def test_stop_string_inside_a_token(default_tokenizer):
    detok, deltas, _ = run(default_tokenizer, "The capital of France is Paris.", stop=("apit",))
    assert "".join(d.text for d in deltas) == "The c"
    assert deltas[-1].stop_string == "apit"


def test_stop_at_very_start(default_tokenizer):
    detok, deltas, _ = run(default_tokenizer, "Hello there, friend.", stop=("Hello",))
    assert deltas[-1].stop_string == "Hello"
    assert "".join(d.text for d in deltas) == ""
    assert detok.output_text == ""


def test_two_stop_strings_earliest_wins(default_tokenizer):
    text = "one two three four five"
    detok, deltas, _ = run(default_tokenizer, text, stop=("four", "two t"))
    assert deltas[-1].stop_string == "two t"
    assert "".join(d.text for d in deltas) == "one "
    detok, deltas, _ = run(default_tokenizer, text, stop=("five", "four"))
    assert deltas[-1].stop_string == "four"
    assert "".join(d.text for d in deltas) == "one two three "


def test_partial_stop_prefix_is_held_then_flushed(default_tokenizer):
    text = "The answer is Par"
    detok, deltas, ids = run(default_tokenizer, text, stop=("Paris.",))
    assert deltas[-1].stop_string is None
    before_finish = "".join(d.text for d in deltas[:-1])
    assert before_finish == "The answer is "  # "Par" held: it may start "Paris."
    assert deltas[-1].text == "Par"
    assert detok.output_text == text


def test_false_start_of_stop_string_is_released(default_tokenizer):
    text = "Paris is big. Paris. done"
    detok, deltas, _ = run(default_tokenizer, text, stop=("Paris.",))
    assert "".join(d.text for d in deltas) == "Paris is big. "
    assert deltas[-1].stop_string == "Paris."


def test_stop_string_with_multibyte(default_tokenizer):
    text = "Weather: ☀️ then 🌧️ later 🙂 ok"
    detok, deltas, _ = run(default_tokenizer, text, stop=("🌧",))
    assert "".join(d.text for d in deltas) == "Weather: ☀️ then "
    assert deltas[-1].stop_string == "🌧"


def test_special_tokens_skipped_or_kept(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("Hi<|im_end|> there", add_special_tokens=False)
    _, deltas, _ = run(tok, "", ids=ids)
    assert "".join(d.text for d in deltas) == tok.decode(ids) == "Hi there"
    _, deltas, _ = run(tok, "", ids=ids, skip_special_tokens=False)
    assert "".join(d.text for d in deltas) == "Hi<|im_end|> there"


def test_add_after_stop_is_empty(default_tokenizer):
    tok = default_tokenizer
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("b",)))
    d = detok.add_tokens(tok.encode("a b c", add_special_tokens=False))
    assert d == DetokDelta("a ", "b")
    assert detok.add_tokens(tok.encode(" more", add_special_tokens=False)).text == ""


ALPHABETS = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=12),
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=20),
    st.text(st.sampled_from(list("aeiouéèüñçøå ÆŒ.,!?\n\t") + ["🙂", "日", "ß", "\u0301"]), max_size=40),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ALPHABETS, chunk=st.integers(1, 3))
def test_hypothesis_concatenation_equals_decode(default_tokenizer, text, chunk):
    tok = default_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    _, deltas, _ = run(tok, text, ids=ids, chunk=chunk)
    joined = "".join(d.text for d in deltas)
    assert joined == tok.decode(ids)
    for d in deltas[:-1]:
        assert not d.text.endswith("\ufffd") or "\ufffd" in text


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.sampled_from(list("ab c🙂é")), max_size=30),
       stop=st.text(st.sampled_from(list("ab c🙂é")), min_size=1, max_size=4))
def test_hypothesis_stop_strings(default_tokenizer, text, stop):
    tok = default_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas, _ = run(tok, text, ids=ids, stop=(stop,))
    joined = "".join(d.text for d in deltas)
    full = tok.decode(ids)
    if stop in full:
        assert deltas[-1].stop_string == stop
        assert joined == full[:full.index(stop)]
    else:
        assert deltas[-1].stop_string is None
        assert joined == full


def test_prompt_ending_mid_character(default_tokenizer):
    tok = default_tokenizer
    emoji_ids = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji_ids) > 1
    out_ids = tok.encode("Hi 日本", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, emoji_ids[:1], SamplingParams())
    text = "".join(detok.add_tokens([i]).text for i in out_ids) + detok.finish().text
    assert text == tok.decode(out_ids)

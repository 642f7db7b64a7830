"""kiln.tokenizer.Tokenizer against transformers on the default model's tokenizer."""

from __future__ import annotations

import pytest
from conftest_tokenizer import default_tokenizer, hf_tokenizer  # noqa: F401  (fixtures)

from kiln.errors import KilnError, RequestError
from kiln.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "The capital of France is Paris.",
    "Zürich, Ærøskøbing, naïve café — façade",
    "日本語のテキストと中文文本",
    "emoji 🙂🚀👩‍👩‍👧 mixed",
    "code:\n\tdef f(x):\n\t\treturn x ** 2\n",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    [{"role": "user", "content": "Wie spät ist es in Zürich? 東京は何時ですか? 🙂"}],
    [{"role": "user", "content": "multi\nline\n\n  content  "}],
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(hf_tokenizer, default_tokenizer, text):
    ids = default_tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    assert default_tokenizer.encode(text, add_special_tokens=False) == \
        hf_tokenizer(text, add_special_tokens=False).input_ids
    assert default_tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert default_tokenizer.decode(ids, skip_special_tokens=False) == \
        hf_tokenizer.decode(ids, skip_special_tokens=False)


def test_basic_properties(hf_tokenizer, default_tokenizer):
    assert default_tokenizer.vocab_size == len(hf_tokenizer)
    assert default_tokenizer.eos_token_ids == (hf_tokenizer.eos_token_id,)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(hf_tokenizer, default_tokenizer, messages, gen):
    ours = default_tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs
    ids = default_tokenizer.encode_chat(messages, add_generation_prompt=gen)
    assert ids == hf_tokenizer(theirs, add_special_tokens=False).input_ids


def test_text_parts_are_joined(default_tokenizer):
    a = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    b = default_tokenizer.apply_chat_template([{"role": "user", "content": "a\nb"}])
    assert a == b


@pytest.mark.parametrize("messages,fragment", [
    ("hello", "list"),
    ([], "non-empty"),
    (["hi"], r"messages\[0\]"),
    ([{"content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 5}], "string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text part"),
])
def test_bad_messages(default_tokenizer, messages, fragment):
    with pytest.raises(RequestError, match=fragment) as e:
        default_tokenizer.apply_chat_template(messages)
    assert e.value.param == "messages"


def _with_template(default_tokenizer, template):
    return Tokenizer(
        default_tokenizer_path(default_tokenizer), chat_template=template,
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def default_tokenizer_path(tok):
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
    tok.backend.save(path)
    return path


def test_no_template(default_tokenizer):
    tok = Tokenizer(default_tokenizer_path(default_tokenizer))
    with pytest.raises(RequestError, match="this model has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_features(default_tokenizer):
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported: ' + m['role']) }}{% endif %}"
        "{% if loop.index > 3 %}{% break %}{% endif %}"
        "{{ m | tojson }}\n"
        "{% endfor %}{{ strftime_now('%Y') | length }}{{ eos_token }}"
        "{% if tools is none %}!{% endif %}"
    )
    tok = _with_template(default_tokenizer, template)
    out = tok.apply_chat_template([{"role": "user", "content": "<b>é</b>"}])
    assert out == '<s>{"role": "user", "content": "<b>é</b>"}\n4</s>!'
    with pytest.raises(RequestError, match="tools are not supported: tool") as e:
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert isinstance(e.value, KilnError) and e.value.param == "messages"
    many = [{"role": "user", "content": str(i)} for i in range(6)]
    assert tok.apply_chat_template(many).count("\n") == 3


def test_template_sandboxed_and_render_errors(default_tokenizer):
    tok = _with_template(default_tokenizer, "{{ messages[0]['content'] + 1 }}")
    with pytest.raises(RequestError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = _with_template(default_tokenizer, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])

"""Tokenizer wrapper: encode/decode with `tokenizers`, chat templates rendered like transformers."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from typing import Any

from kiln.errors import EngineLoadError, RequestError


_RELEASE_GIL_CHARS = 16 << 10


class ChatTemplateError(RequestError):
    """The chat template refused the conversation (its raise_exception, or a render error)."""

    def __init__(self, message: str):
        super().__init__(message, param="messages")


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Same as transformers: no HTML escaping (unlike jinja's built-in tojson).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise EngineLoadError(f"chat template does not parse: {e.message} (line {e.lineno})") from e


def _bad(msg: str) -> RequestError:
    return RequestError(msg, param="messages")


def validate_messages(messages: Any) -> list[dict]:
    """Check the OpenAI-style message list; list-of-text-parts content becomes one string."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects")
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role must be a non-empty string")
        if "content" not in m:
            raise _bad(f"messages[{i}] has no 'content'")
        content = m["content"]
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type", "text") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise _bad(f"messages[{i}].content[{j}] must be a text part, got {kind!r}")
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad(f"messages[{i}].content[{j}].text must be a string")
                texts.append(text)
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts, "
                       f"got {type(content).__name__}")
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's chat template and special tokens.

    special_tokens: transformers-style map, e.g. {"bos_token": "<s>", "eos_token": "</s>"};
    every entry is visible to the chat template as a variable.
    """

    def __init__(self, tokenizer_json_path: str, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, eos_token_ids=()):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(tokenizer_json_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise EngineLoadError(f"cannot load tokenizer {tokenizer_json_path}: {e}") from e
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._template = _compile_template(chat_template) if chat_template else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @cached_property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_token_bytes(self) -> int:
        """Bytes of the longest token's text (at least 1): a text of B bytes has at least
        B // max_token_bytes tokens, a bound known without tokenizing it."""
        return max((len(t.encode("utf-8")) for t in self._tok.get_vocab(with_added_tokens=True)), default=1) or 1

    @property
    def backend(self):
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _RELEASE_GIL_CHARS:  # encode_batch releases the GIL; encode holds it throughout
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render the conversation to the prompt text (encode it with add_special_tokens=False)."""
        if self._template is None:
            raise RequestError("this model has no chat template", param="messages")
        msgs = validate_messages(messages)
        import jinja2

        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except RequestError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"chat template could not render these messages: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

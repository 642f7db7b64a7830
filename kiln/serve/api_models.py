"""Pydantic models of the OpenAI-compatible request bodies.

Types are checked here; value ranges are checked once, by `SamplingParams` (the same rules as the
offline API), so both paths refuse the same things with the same messages. OpenAI's optional
fields accept an explicit null (their default). Unknown fields are ignored, as OpenAI clients send
fields a server may not use (`metadata`, `store`, ...); fields that would change the answer and
that kiln does not implement (tools, JSON mode, logit bias) are refused rather than ignored.
Every string must be encodable as UTF-8 (JSON can carry a lone surrogate such as "\\ud800").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 2048  # a chat's messages: each one costs template rendering work


def _check_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_text(v)
    return value


class _Text(BaseModel):
    """Every field's strings, however nested, must be valid Unicode."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return _check_text(v)


class _Body(_Text):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = False


class _SamplingFields(_Body):
    """Fields both completion endpoints share, OpenAI's and kiln's extensions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # refused unless empty
    # extensions (vLLM-compatible names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    priority: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None


class ChatMessage(_Text):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the chat template

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    # refused when set: kiln does not implement them (see generation.unsupported)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)

"""OpenAI response bodies: chat and text completions, whole or as stream chunks, usage, logprobs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from kiln.outputs import CompletionOutput, TokenLogprob
from kiln.tokenizer import Tokenizer
from kiln.version import __version__

FINGERPRINT = f"kiln-{__version__}"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Envelope:
    """What every body or chunk of one response shares."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, chunk: bool) -> dict:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}


def _token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob], top_n: int) -> dict:
    def entry(token_id: int, lp: float) -> dict:
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token_id, t.logprob),
                         "top_logprobs": [entry(i, v) for i, v in t.top[:top_n]]} for t in lps],
            "refusal": None}


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], text_offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for t in lps:
        text = _token_text(tok, t.token_id)
        tokens.append(text)
        token_lps.append(t.logprob)
        tops.append({_token_text(tok, i): v for i, v in t.top} if t.top else None)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_choice(tok: Tokenizer, o: CompletionOutput, index: int, logprobs: bool, top_n: int) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": o.text},
            "logprobs": chat_logprobs(tok, o.logprobs or [], top_n) if logprobs else None,
            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}


def completion_choice(tok: Tokenizer, o: CompletionOutput, index: int, prefix: str,
                      logprobs: bool) -> dict:
    return {"index": index, "text": prefix + o.text,
            "logprobs": completion_logprobs(tok, o.logprobs or [], len(prefix)) if logprobs else None,
            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}

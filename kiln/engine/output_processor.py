"""Turns the engine's token events into text: incremental detokenization and stop strings.

It sits outside the engine step (in the offline LLM here; in the API process when serving), and tells
the engine to finish a request when a stop string appears.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from kiln.engine.events import TokenEvent
from kiln.engine.detokenizer import IncrementalDetokenizer
from kiln.engine.request import FinishReason, Request
from kiln.outputs import CompletionOutput, RequestMetrics, TokenLogprob
from kiln.tokenizer import Tokenizer


@dataclass
class _Tracked:
    request: Request
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Delta:
    """New text and tokens of one choice since the last delta. The choice's last delta has
    `finish_reason` set and carries the whole `output`; after it, nothing about the choice is kept."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    output: CompletionOutput | None = None
    logprobs: list[TokenLogprob] | None = None  # of this delta's tokens, when asked for


def metrics_of(req: Request) -> RequestMetrics:
    return RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                          req.finished_time, req.num_prompt_tokens, req.num_cached_tokens,
                          req.num_preemptions)


class OutputProcessor:
    """Per-choice text state from `track` until the choice's final Delta, then forgotten."""

    def __init__(self, tokenizer: Tokenizer,
                 finish_request: Callable[[str, FinishReason, int | str | None], object]):
        self.tokenizer = tokenizer
        self._finish_request = finish_request
        self._tracked: dict[str, _Tracked] = {}
        self._pending: list[Delta] = []  # final deltas of aborted choices, for the next process()

    def track(self, req: Request, index: int) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params)
        lps = [] if req.params.logprobs is not None else None
        self._tracked[req.request_id] = _Tracked(req, index, detok, logprobs=lps)

    @property
    def num_tracked(self) -> int:
        return len(self._tracked)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def process(self, events: list[TokenEvent]) -> list[Delta]:
        deltas, self._pending = self._pending, []
        for ev in events:
            t = self._tracked.get(ev.request.request_id)
            if t is None:
                continue  # a token generated after a stop string or an abort already ended the choice
            t.token_ids.append(ev.token_id)
            new_lps = None
            if t.logprobs is not None and ev.logprobs is not None:
                new_lps = [TokenLogprob(ev.token_id, ev.logprobs.logprob, ev.logprobs.top)]
                t.logprobs.extend(new_lps)
            d = t.detok.add_tokens([ev.token_id])
            text = d.text
            if d.stop_string is None and ev.finish_reason is not None:
                flushed = t.detok.finish()  # held-back text; a stop string may still complete in it
                text += flushed.text
                d = flushed if flushed.stop_string is not None else d
            if d.stop_string is not None:
                t.finish_reason, t.stop_reason = FinishReason.STOP.value, d.stop_string
                if ev.finish_reason is None:
                    self._finish_request(ev.request.request_id, FinishReason.STOP, d.stop_string)
            elif ev.finish_reason is not None:
                t.finish_reason = ev.finish_reason.value
                t.stop_reason = ev.request.stop_reason
            delta = Delta(ev.request.request_id, t.index, text, [ev.token_id], t.finish_reason,
                          logprobs=new_lps)
            if t.finish_reason is not None:
                delta.output = self._close(ev.request.request_id)
            deltas.append(delta)
        return deltas

    def abort(self, request_id: str) -> bool:
        """End a choice the engine has dropped: its final Delta (finish_reason "abort") comes out of
        the next `process()`. Returns False if the choice was not being tracked."""
        if request_id not in self._tracked:
            return False
        self._tracked[request_id].finish_reason = FinishReason.ABORT.value
        out = self._close(request_id)
        self._pending.append(Delta(request_id, out.index, "", [], out.finish_reason, out))
        return True

    def forget(self, request_ids: set[str]) -> None:
        """Drop choices without a final Delta (their request was never handed to the caller)."""
        for rid in request_ids:
            self._tracked.pop(rid, None)
        self._pending = [d for d in self._pending if d.request_id not in request_ids]

    def _close(self, request_id: str) -> CompletionOutput:
        t = self._tracked.pop(request_id)
        if t.request.finished_time is None:
            t.request.finished_time = time.monotonic()
        return CompletionOutput(t.index, t.detok.output_text, t.token_ids, t.finish_reason,
                                t.stop_reason, t.logprobs, metrics_of(t.request))

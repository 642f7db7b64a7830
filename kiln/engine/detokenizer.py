"""Incremental detokenization with stop strings.

Each call to `add_tokens` returns only text that is safe to show now:
  * never a broken UTF-8 character: text is held while the decoded tail ends with U+FFFD
    (an incomplete byte sequence), using the prefix/read offset technique over a small
    window of recent tokens;
  * never any part of a stop string: the longest suffix of the pending text that is a
    prefix of some stop string is held back; when a stop string appears, text up to its
    start is emitted and the stop string is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 4  # prompt tokens decoded as context for the first output tokens


@dataclass(frozen=True)
class DetokDelta:
    text: str  # newly emitted text (may be empty)
    stop_string: str | None = None  # the stop string that ended the request, if one did


class IncrementalDetokenizer:
    """Turns a stream of output token ids into a stream of text deltas.

    `tokenizer` is a kiln.tokenizer.Tokenizer (anything with `decode(ids, skip_special_tokens)`).
    """

    def __init__(self, tokenizer, prompt_token_ids, params: SamplingParams):
        self._tok = tokenizer
        self._skip = params.skip_special_tokens
        self._stops = tuple(params.stop)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        # A little prompt context makes the first output tokens decode as they would
        # in place (e.g. SentencePiece's leading space); dropped if it is not clean text.
        ctx = list(prompt_token_ids[-_PROMPT_CONTEXT:]) if prompt_token_ids else []
        if ctx and _REPLACEMENT in self._decode(ctx):
            ctx = []
        self._ids: list[int] = ctx  # context + output ids
        self._num_context = len(ctx)
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self._pending = ""  # decoded text held back (possible start of a stop string)
        self._emitted: list[str] = []
        self.stop_string: str | None = None
        self.finished = False

    @property
    def output_text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _decode_step(self, final: bool) -> str:
        """Newly complete text since the read offset; advances the offsets when any."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # an incomplete UTF-8 sequence: wait for the bytes that finish it
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def _emit(self, new_text: str, final: bool) -> DetokDelta:
        text = self._pending + new_text
        if self._stops and text:
            best = -1
            best_stop = None
            for s in self._stops:
                i = text.find(s)
                if i != -1 and (best == -1 or i < best):
                    best, best_stop = i, s
            if best_stop is not None:
                out = text[:best]
                self._pending = ""
                self.stop_string = best_stop
                self.finished = True
                if out:
                    self._emitted.append(out)
                return DetokDelta(out, best_stop)
        hold = 0 if final else self._hold_length(text)
        out = text[:len(text) - hold]
        self._pending = text[len(text) - hold:]
        if out:
            self._emitted.append(out)
        return DetokDelta(out, None)

    def add_tokens(self, new_ids) -> DetokDelta:
        """Feed newly generated token ids; returns the text that may be shown now."""
        if self.finished:
            return DetokDelta("", None)
        self._ids.extend(int(t) for t in new_ids)
        return self._emit(self._decode_step(final=False), final=False)

    def finish(self) -> DetokDelta:
        """End of the request (for any reason but a stop string): flush everything held.

        A stop string can still be found in the flushed text; then it is reported as usual.
        """
        if self.finished:
            return DetokDelta("", None)
        delta = self._emit(self._decode_step(final=True), final=True)
        self.finished = True
        return delta

"""The offline Python API: `LLM(engine_dir).generate(prompts, params)` and `LLM.chat(messages)`."""

from __future__ import annotations

import itertools
import numbers
import secrets
from pathlib import Path
from typing import Iterator, Sequence

from kiln.engine.core import EngineCore, EngineOptions
from kiln.engine.output_processor import Delta, OutputProcessor
from kiln.engine.request import choice_ids, choice_requests, choice_seed
from kiln.errors import RequestError
from kiln.outputs import CompletionOutput, RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.tokenizer import Tokenizer

Prompt = str | Sequence[int]
Messages = list[dict]


def resolve_engine_dir(engine_dir: str | Path) -> Path:
    if str(engine_dir) == "default":
        from kiln.build.default_model import ensure_default_engine

        return ensure_default_engine()
    return Path(engine_dir)


class LLM:
    """Generate from a built engine directory (or "default": the embedded model, built on first use)."""

    def __init__(self, engine_dir: str | Path = "default", **options):
        self.engine_dir = resolve_engine_dir(engine_dir)
        self.core = EngineCore(self.engine_dir, EngineOptions(**options))
        m = self.core.manifest
        self.eos_token_ids = tuple(m.eos_token_ids or m.model.eos_token_ids)
        self.tokenizer = Tokenizer(m.tokenizer_path, m.chat_template, m.special_tokens,
                                   self.eos_token_ids)
        self.processor = OutputProcessor(self.tokenizer, self.core.finish)
        self._ids = itertools.count()
        self._groups: dict[str, list[str]] = {}  # request id -> its unfinished-or-unreleased choices
        self._group_of: dict[str, str] = {}  # choice id -> request id, until its final Delta

    @property
    def max_seq_len(self) -> int:
        return self.core.manifest.profile.max_seq_len

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text, or token ids that are checked against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty", param="prompt")
            return self.tokenizer.encode(prompt)
        if hasattr(prompt, "tolist"):  # numpy array, torch tensor
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence) or not all(_is_int(t) for t in prompt):
            raise RequestError("prompt must be a string or a list of integer token ids", param="prompt")
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        ids = [int(t) for t in prompt]
        vocab = self.core.manifest.model.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        return ids

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> list[str]:
        """Queue one prompt (n choices); returns the ids of its choices (`request_id` itself when
        n = 1, else `request_id-0` ...). Refusals raise RequestError and leave nothing queued."""
        return self._add(prompt_ids, params, request_id)[1]

    def _add(self, prompt_ids: list[int], params: SamplingParams,
             request_id: str | None) -> tuple[str, list[str]]:
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._groups:
            raise RequestError(f"request id {rid!r} is already in use", param="request_id")
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        ids = choice_ids(rid, params.n)
        reqs = choice_requests([(c, choice_seed(base_seed, i)) for i, c in enumerate(ids)], prompt_ids,
                               params, self.eos_token_ids)
        added: list[str] = []
        try:
            for i, req in enumerate(reqs):
                self.core.add_request(req)
                added.append(req.request_id)
                self.processor.track(req, i)
        except BaseException:
            self._drop(added)
            raise
        self._groups[rid] = added
        for a in added:
            self._group_of[a] = rid
        return rid, added

    def _drop(self, choices: list[str]) -> None:
        """Remove choices the caller never saw finish, without final deltas."""
        for c in choices:
            self.core.abort(c)
            rid = self._group_of.pop(c, None)
            if rid is not None:
                self._groups.pop(rid, None)
        self.processor.forget(set(choices))

    def abort(self, request_id: str) -> None:
        """Stop a request (all its choices) or one choice, wherever it is; frees its KV blocks.
        Each choice that was still running gets a final Delta with finish_reason "abort"."""
        for choice in self._groups.get(request_id, [request_id]):
            self.core.abort(choice)
            self.processor.abort(choice)

    def stream(self) -> Iterator[Delta]:
        """Run steps until no request is left, yielding each new piece of text."""
        while self.core.has_unfinished() or self.processor.has_pending:
            events = self.core.step() if self.core.has_unfinished() else []
            for d in self.processor.process(events):
                if d.finish_reason is not None:
                    self._release(d.request_id)
                yield d

    def _release(self, choice_id: str) -> None:
        rid = self._group_of.pop(choice_id, None)
        if rid is not None and all(c not in self._group_of for c in self._groups[rid]):
            del self._groups[rid]

    @property
    def num_unfinished(self) -> int:
        return len(self._group_of)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one RequestOutput per prompt.

        Runs the engine until these requests are done, so it needs an engine with nothing else in
        flight (requests queued with `add_request` are driven by `stream`)."""
        prompts = _as_prompt_list(prompts)
        return self._run(prompts, [self.encode_prompt(p) for p in prompts], params)

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        if not isinstance(messages, Sequence) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        texts = [self.tokenizer.apply_chat_template(c) for c in convs]  # validates each conversation
        encoded = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return self._run(texts, encoded, params)

    def _run(self, prompts: list, encoded: list[list[int]],
             params: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        if self.core.has_unfinished():
            raise RequestError("generate() needs an idle engine: requests added with add_request() "
                               "are still running (drive them with stream())")
        params = params if params is not None else SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts) or not all(isinstance(p, SamplingParams) for p in plist):
            raise RequestError("params must be one SamplingParams, or one per prompt", param="params")
        added: list[tuple[str, list[str]]] = []
        outputs: dict[str, CompletionOutput] = {}
        try:
            for ids, p in zip(encoded, plist):
                added.append(self._add(ids, p, None))
            for d in self.stream():
                if d.output is not None:
                    outputs[d.request_id] = d.output
        except BaseException:  # a refusal or an interrupt: nothing of this call stays queued
            self._drop([c for _, choices in added for c in choices])
            raise
        return [
            RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                          [outputs[c] for c in choices])
            for (rid, choices), prompt, ids in zip(added, prompts, encoded)
        ]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _as_prompt_list(prompts) -> list:
    """One prompt (a string, a list of ids, an array) or a list of them -> a non-empty list."""
    if hasattr(prompts, "tolist"):
        prompts = prompts.tolist()
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise RequestError("prompts must be a string, a list of token ids, or a list of those",
                           param="prompt")
    if not prompts:
        raise RequestError("no prompts given", param="prompt")
    if _is_int(prompts[0]):
        return [prompts]
    return list(prompts)

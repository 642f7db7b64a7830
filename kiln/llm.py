"""The offline Python API: `LLM(engine_dir).generate(prompts, params)` and `LLM.chat(messages)`."""

from __future__ import annotations

import hashlib
import itertools
import secrets
from pathlib import Path
from typing import Iterator, Sequence

from kiln.engine.core import EngineCore, EngineOptions
from kiln.engine.output_processor import Delta, OutputProcessor
from kiln.engine.request import Request
from kiln.errors import RequestError
from kiln.outputs import RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.tokenizer import Tokenizer

Prompt = str | Sequence[int]
Messages = list[dict]


def choice_seed(seed: int, index: int) -> int:
    """Seed of choice `index` of an n > 1 request: distinct per choice, fixed for a given seed."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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

    @property
    def max_seq_len(self) -> int:
        return self.core.manifest.profile.max_seq_len

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty", param="prompt")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        vocab = self.core.manifest.model.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        return ids

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> list[str]:
        """Queue one prompt (n choices); returns the ids of its choices. Refusals raise RequestError."""
        rid = request_id or f"req-{next(self._ids)}"
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        reqs: list[Request] = []
        for i in range(params.n):
            req = Request(f"{rid}-{i}" if params.n > 1 else rid, list(prompt_ids), params,
                          seed=choice_seed(base_seed, i), eos_token_ids=self.eos_token_ids,
                          prefill_leader=reqs[0] if reqs else None)
            reqs.append(req)
        added: list[str] = []
        try:
            for i, req in enumerate(reqs):
                self.core.add_request(req)
                added.append(req.request_id)
                self.processor.track(req, i)
        except Exception:
            for a in added:
                self.abort(a)
            raise
        return added

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self.processor.mark_aborted(request_id)

    def stream(self) -> Iterator[Delta]:
        """Run steps until no request is left, yielding each new piece of text."""
        while self.core.has_unfinished():
            yield from self.processor.process(self.core.step())

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError("one SamplingParams per prompt, or one for all", param="params")
        encoded = [self.encode_prompt(p) for p in prompts]
        groups = []
        for ids, p in zip(encoded, plist):
            groups.append(self.add_request(ids, p))
        for _ in self.stream():
            pass
        return [
            RequestOutput(g[0].rsplit("-", 1)[0] if len(g) > 1 else g[0],
                          prompt if isinstance(prompt, str) else None, ids,
                          [self.processor.result(rid) for rid in g])
            for g, prompt, ids in zip(groups, prompts, encoded)
        ]

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c),
                                         add_special_tokens=False) for c in convs]
        return self.generate(prompts, params)

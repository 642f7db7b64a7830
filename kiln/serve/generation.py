"""One completion request end to end: checks, admission, tokenization, generation, the response.

Order matters for overload: the cheap checks (model, phase, sampling values, slot count) run first,
then admission (which may refuse at once with 503, before any tokenization), then the prompt is
tokenized and checked against the context, then the request waits for its turn (408 past the
timeout). Streaming responses and non-streaming ones both watch for the client leaving: a
disconnect cancels the generation, which aborts the request in the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.engine.output_processor import Delta
from kiln.errors import RequestError
from kiln.outputs import CompletionOutput
from kiln.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from kiln.serve import openai_format as F
from kiln.serve.admission import Overloaded, Ticket
from kiln.serve.api_errors import APIError, error_body
from kiln.serve.api_models import ChatCompletionRequest, CompletionRequest
from kiln.serve.engine_client import WorkerDied
from kiln.serve.state import Phase, ServerState

log = logging.getLogger("kiln.serve")

TOKENIZE_IN_THREAD_CHARS = 8192  # longer prompts are tokenized off the event loop
RETRY_AFTER_S = "1"


def unavailable(state: ServerState) -> APIError | None:
    """The 503 for a server that does not take new work now, or None."""
    phase = state.serving_phase()
    if phase is Phase.READY:
        return None
    msg = {Phase.LOADING: "the model is still loading; retry shortly",
           Phase.DRAINING: "the server is shutting down",
           Phase.DEAD: "the inference worker is not running"}[phase]
    return APIError(503, msg, None, phase.value, {"Retry-After": RETRY_AFTER_S})


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.cfg.served_model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                            f"{state.cfg.served_model_name!r}", "model", "model_not_found")


@dataclass
class _Job:
    """A checked request: its prompts (token ids), per-prompt sampling params, and how to answer."""

    chat: bool
    prompts: list[list[int]]
    params: list[SamplingParams]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo_texts: list[str]


# ---------------------------------------------------------------------------- checks
def _sampling(body: ChatCompletionRequest | CompletionRequest, chat: bool) -> tuple[SamplingParams, str]:
    """SamplingParams from the body (max_tokens resolved later, per prompt), and the name of
    the max-tokens field the client used."""
    mt_name, mt = "max_tokens", body.max_tokens
    if chat:
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, "
                               f"got {body.top_logprobs}", param="top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.max_completion_tokens is not None:
            mt_name, mt = "max_completion_tokens", body.max_completion_tokens
    else:
        logprobs = body.logprobs
    if mt is not None and mt < 1:
        raise RequestError(f"{mt_name} must be at least 1, got {mt}", param=mt_name)
    stop = body.stop if body.stop is not None else ()
    if isinstance(stop, str):
        stop = (stop,)
    params = SamplingParams(
        max_tokens=mt if mt is not None else 1, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, n=body.n, stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()), min_tokens=0, ignore_eos=body.ignore_eos,
        logprobs=logprobs, skip_special_tokens=body.skip_special_tokens, priority=body.priority)
    return params, mt_name


def _fit(state: ServerState, ids: list[int], params: SamplingParams, body, mt_name: str,
         prompt_param: str, default_max: int | None) -> SamplingParams:
    """The prompt's final params: max_tokens defaulted or checked against the context."""
    ctx = state.max_seq_len
    vocab = state.vocab_size
    if not ids:
        raise RequestError(f"{prompt_param} is empty", param=prompt_param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param=prompt_param)
    if len(ids) >= ctx:
        raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {ctx} tokens, "
                           f"leaving no room to generate", param=prompt_param)
    asked = body.max_completion_tokens if mt_name == "max_completion_tokens" else body.max_tokens
    if asked is None:
        max_tokens = ctx - len(ids) if default_max is None else min(default_max, ctx - len(ids))
    elif len(ids) + asked > ctx:
        raise RequestError(f"the prompt has {len(ids)} tokens and {mt_name} is {asked}: together "
                           f"{len(ids) + asked}, more than the model's context of {ctx} tokens",
                           param=mt_name)
    else:
        max_tokens = asked
    ready = state.client.ready
    room = ready.total_blocks * ready.block_size  # one sequence alone can use the whole KV pool
    if len(ids) + max_tokens > room:
        if asked is not None:
            raise RequestError(f"the prompt has {len(ids)} tokens and {mt_name} is {asked}: together "
                               f"{len(ids) + asked}, more than the KV cache holds ({room} tokens)",
                               param=mt_name)
        if len(ids) >= room:
            raise RequestError(f"the prompt has {len(ids)} tokens, more than the KV cache holds "
                               f"({room} tokens)", param=prompt_param)
        max_tokens = room - len(ids)
    if body.min_tokens > max_tokens:
        raise RequestError(f"min_tokens must be at most {mt_name} ({max_tokens}), got {body.min_tokens}",
                           param="min_tokens")
    return dataclasses.replace(params, max_tokens=max_tokens, min_tokens=body.min_tokens)


def _check_stop_ids(state: ServerState, params: SamplingParams) -> None:
    bad = next((t for t in params.stop_token_ids if t >= state.vocab_size), None)
    if bad is not None:
        raise RequestError(f"stop token id {bad} is outside the vocabulary [0, {state.vocab_size})",
                           param="stop_token_ids")


def _completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise RequestError("prompt is empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)  # a batch: list of strings or of token-id lists


def _min_prompt_tokens(state: ServerState, body, chat: bool, raw_prompts: list) -> int:
    """A lower bound of the request's prompt tokens, without tokenizing: token-id prompts count
    exactly, text counts its bytes over the longest token's."""
    if chat:
        texts = []
        for m in body.messages:
            c = m.content
            texts += [c] if isinstance(c, str) else [p.get("text", "") for p in c or [] if isinstance(p, dict)]
        return sum(len(t.encode("utf-8")) for t in texts if isinstance(t, str)) // state.tokenizer.max_token_bytes
    n = 0
    for p in raw_prompts:
        n += len(p.encode("utf-8")) // state.tokenizer.max_token_bytes if isinstance(p, str) else len(p)
    return n


async def encode(state: ServerState, fn, *args) -> list[int]:
    text_len = sum(len(a) for a in args if isinstance(a, str))
    if text_len > TOKENIZE_IN_THREAD_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


# ---------------------------------------------------------------------------- generation
async def _generate(state: ServerState, job: _Job, rid: str) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of every choice of every prompt; index = prompt index * n + choice index."""
    client = state.client
    n = job.params[0].n
    if len(job.prompts) == 1:
        async for d in client.generate(job.prompts[0], job.params[0], rid):
            yield d.index, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for d in client.generate(job.prompts[i], job.params[i], f"{rid}-{i}"):
                q.put_nowait((i * n + d.index, d))
        except Exception as e:
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(job.prompts))]
    remaining = len(tasks)
    try:
        while remaining:
            idx, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield idx, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Tracker:
    """Per-request bookkeeping for metrics (inter-token latency, finals) and the usage block."""

    def __init__(self, state: ServerState, job: _Job, arrival: float):
        self.state, self.job, self.arrival = state, job, arrival
        self.last: dict[int, float] = {}
        self.finals: dict[int, CompletionOutput] = {}

    def saw(self, idx: int, d: Delta) -> None:
        now = time.monotonic()
        if d.token_ids:
            if idx in self.last:
                self.state.metrics.itl.observe(now - self.last[idx])
            self.last[idx] = now
        if d.output is not None:
            self.finals[idx] = d.output

    def usage(self) -> F.Usage:
        n = self.job.params[0].n
        cached = sum(o.metrics.num_cached_tokens for i, o in self.finals.items()
                     if o.metrics is not None and i % n == 0)
        return F.Usage(sum(len(p) for p in self.job.prompts),
                       sum(len(o.token_ids) for o in self.finals.values()), cached)

    def done(self) -> None:
        expected = len(self.job.prompts) * self.job.params[0].n
        self.state.metrics.finished(self.arrival, sum(len(p) for p in self.job.prompts),
                                    list(self.finals.values()), complete=len(self.finals) == expected)


async def _until_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _wait_turn(adm, ticket: Ticket, timeout: float, receive) -> bool:
    """Wait for a running slot, or until the client disconnects (returns False)."""
    if ticket.granted:
        return True
    turn = asyncio.create_task(adm.wait(ticket, timeout))
    gone = asyncio.create_task(_until_disconnect(receive))
    await asyncio.wait({turn, gone}, return_when=asyncio.FIRST_COMPLETED)
    for t in (turn, gone):
        t.cancel()
    await asyncio.gather(turn, gone, return_exceptions=True)
    if turn.cancelled():
        return False
    turn.result()  # re-raises TimeoutError or Overloaded
    return True


def _err_event(status: int, message: str, code: str) -> bytes:
    return F.sse(error_body(status, message, None, code))


class _SSE(StreamingResponse):
    """A server-sent-events response that stops the generation the moment the client leaves,
    and always runs `on_close` (which gives the admission slot back)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close, headers: dict[str, str]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", **headers})
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        body = asyncio.create_task(pump())
        gone = asyncio.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (body, gone):
                t.cancel()
            await asyncio.gather(body, gone, return_exceptions=True)
            await self.chunks.aclose()
            self.on_close()


def _chunks(state: ServerState, job: _Job, rid: str, tracker: _Tracker) -> AsyncIterator[bytes]:
    env = F.Envelope(rid, state.cfg.served_model_name, job.chat)
    tok = state.tokenizer
    n = job.params[0].n
    usage_null = {"usage": None} if job.include_usage else {}
    text_offset: dict[int, int] = {}

    def chunk(choice: dict) -> bytes:
        return F.sse({**env.head(True), "choices": [choice], **usage_null})

    async def gen() -> AsyncIterator[bytes]:
        try:
            for idx in range(len(job.prompts) * n):
                if job.chat:
                    yield chunk({"index": idx, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None})
                elif job.echo_texts:
                    echo = job.echo_texts[idx // n]
                    text_offset[idx] = len(echo)
                    yield chunk({"index": idx, "text": echo, "logprobs": None, "finish_reason": None})
            async for idx, d in _generate(state, job, rid):
                tracker.saw(idx, d)
                if not d.text and d.finish_reason is None and not job.logprobs:
                    continue  # held back (partial character or possible stop string)
                lps = d.logprobs or []
                if job.chat:
                    delta = {"content": d.text} if d.text else {}
                    lp = F.chat_logprobs(tok, lps, job.top_logprobs) if job.logprobs and lps else None
                    c = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
                else:
                    off = text_offset.get(idx, 0)
                    lp = F.completion_logprobs(tok, lps, off) if job.logprobs and lps else None
                    text_offset[idx] = off + len(d.text)
                    c = {"index": idx, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
                if d.finish_reason is not None:
                    c["stop_reason"] = d.output.stop_reason if d.output else None
                yield chunk(c)
            if job.include_usage:
                yield F.sse({**env.head(True), "choices": [], "usage": tracker.usage().to_dict()})
            yield F.SSE_DONE
        except RequestError as e:
            yield F.sse(error_body(400, str(e), e.param, "invalid_value"))
        except WorkerDied as e:
            yield _err_event(500, str(e), "worker_died")
        finally:
            tracker.done()
            if state.cfg.log_requests:
                _log_outputs(rid, tracker)

    return gen()


async def _collect(state: ServerState, job: _Job, rid: str, tracker: _Tracker) -> dict:
    async for idx, d in _generate(state, job, rid):
        tracker.saw(idx, d)
    env = F.Envelope(rid, state.cfg.served_model_name, job.chat)
    tok, n = state.tokenizer, job.params[0].n
    choices = []
    for idx in sorted(tracker.finals):
        o = tracker.finals[idx]
        if job.chat:
            choices.append(F.chat_choice(tok, o, idx, job.logprobs, job.top_logprobs))
        else:
            prefix = job.echo_texts[idx // n] if job.echo_texts else ""
            choices.append(F.completion_choice(tok, o, idx, prefix, job.logprobs))
    return {**env.head(False), "choices": choices, "usage": tracker.usage().to_dict()}


def _log_outputs(rid: str, tracker: _Tracker) -> None:
    for idx, o in sorted(tracker.finals.items()):
        log.info("request %s choice %d (%s): %r", rid, idx, o.finish_reason, o.text)


# ---------------------------------------------------------------------------- entry point
async def handle(state: ServerState, body: ChatCompletionRequest | CompletionRequest,
                 request: Request, chat: bool) -> Response:
    arrival = time.monotonic()
    m = state.metrics
    check_model(state, body.model)
    err = unavailable(state)
    if err is not None:
        m.rejected("draining" if state.phase is Phase.DRAINING else "loading")  # or dead
        raise err
    try:
        params, mt_name = _sampling(body, chat)
        _check_stop_ids(state, params)
        if chat:
            raw_prompts: list = [None]
            if not body.messages:
                raise RequestError("messages must not be empty", param="messages")
        else:
            if body.echo and body.logprobs is not None:
                raise RequestError("echo with logprobs is not supported (no prompt logprobs)", param="echo")
            if body.suffix:
                raise RequestError("suffix is not supported", param="suffix")
            raw_prompts = _completion_prompts(body)
        seqs = params.n * len(raw_prompts)
        adm = state.admission
        if seqs > adm.max_running_seqs:
            raise RequestError(f"n x prompts = {seqs} sequences, more than this server runs at once "
                               f"({adm.max_running_seqs})", param="n")
    except RequestError:
        m.rejected("invalid")
        raise
    try:
        ticket: Ticket = adm.enter(seqs, params.priority, _min_prompt_tokens(state, body, chat, raw_prompts))
    except Overloaded as e:
        m.rejected(e.reason)
        raise APIError(503, str(e), None, e.reason, {"Retry-After": RETRY_AFTER_S}) from None
    try:
        job = await _prepare(state, body, chat, params, mt_name, raw_prompts)
        adm.set_tokens(ticket, sum(len(p) for p in job.prompts))
        if not await _wait_turn(adm, ticket, state.cfg.request_timeout, request.receive):
            adm.release(ticket)
            m.rejected("client_gone")
            return Response(status_code=499)  # the client left while waiting; nobody to answer
    except RequestError:
        adm.release(ticket)
        m.rejected("invalid")
        raise
    except Overloaded as e:
        adm.release(ticket)
        m.rejected(e.reason)
        raise APIError(503, str(e), None, e.reason, {"Retry-After": RETRY_AFTER_S}) from None
    except asyncio.TimeoutError:
        adm.release(ticket)
        m.rejected("timeout")
        raise APIError(408, f"the request waited in the queue longer than {state.cfg.request_timeout:g} s",
                       None, "queue_timeout") from None
    except BaseException:
        adm.release(ticket)
        raise

    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if state.cfg.log_requests:
        log.info("request %s (x-request-id %s): %s", rid, request.scope.get("state", {}).get("request_id"),
                 body.model_dump_json(exclude_none=True))
    tracker = _Tracker(state, job, arrival)
    if job.stream:
        return _SSE(_chunks(state, job, rid, tracker), lambda: adm.release(ticket), {})
    try:
        work = asyncio.create_task(_collect(state, job, rid, tracker))
        gone = asyncio.create_task(_until_disconnect(request.receive))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)  # nobody is listening
        gone.cancel()
        try:
            result = work.result()
        except WorkerDied as e:
            raise APIError(500, str(e), None, "worker_died") from None
        if state.cfg.log_requests:
            _log_outputs(rid, tracker)
        return JSONResponse(result)
    finally:
        tracker.done()
        adm.release(ticket)


async def _prepare(state: ServerState, body, chat: bool, params: SamplingParams, mt_name: str,
                   raw_prompts: list) -> _Job:
    tok = state.tokenizer
    echo_texts: list[str] = []
    if chat:
        messages = [mm.model_dump(exclude_none=False) for mm in body.messages]
        text = await encode(state, lambda ms: tok.apply_chat_template(
            ms, add_generation_prompt=body.add_generation_prompt), messages)
        ids_list = [await encode(state, lambda t: tok.encode(t, add_special_tokens=False), text)]
        prompt_param, default_max = "messages", None
    else:
        ids_list = []
        for p in raw_prompts:
            if isinstance(p, str):
                if not p:
                    raise RequestError("prompt is empty", param="prompt")
                ids_list.append(await encode(state, tok.encode, p))
            elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                ids_list.append(list(p))
            else:
                raise RequestError("prompt must be a string, a list of strings, a list of token ids, "
                                   "or a list of token-id lists, none of them empty", param="prompt")
            if body.echo:
                echo_texts.append(p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False))
        prompt_param, default_max = "prompt", 16
    per_prompt = [_fit(state, ids, params, body, mt_name, prompt_param, default_max) for ids in ids_list]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if chat:
        logprobs, top = body.logprobs, body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0
    return _Job(chat, ids_list, per_prompt, body.stream, include_usage, logprobs, top, echo_texts)

"""One completion request end to end: checks, admission, tokenization, generation, the response.

Order matters for overload: the cheap checks (model, phase, sampling values, slot count) run first,
then admission (which may refuse at once with 503, before any tokenization), then the prompt is
tokenized and checked against the context, then the request waits for its turn (408 past the
timeout; a client that leaves while waiting gives its place back).

Generation is paced by the engine, not by the client: a producer task drains the engine's deltas
into a local queue and gives the running slot back as soon as the engine is done, so a client that
reads slowly (or not at all) never holds a slot. A client that disconnects, streaming or not,
cancels the producer, which aborts the request in the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.engine.output_processor import Delta
from kiln.errors import RequestError
from kiln.outputs import CompletionOutput
from kiln.serve import openai_format as F
from kiln.serve.admission import Overloaded, Ticket
from kiln.serve.api_errors import APIError, error_body
from kiln.serve.api_models import ChatCompletionRequest, CompletionRequest
from kiln.serve.engine_client import WorkerDied
from kiln.serve.request_checks import Job, checked_request, prepare_job
from kiln.serve.state import Phase, ServerState

log = logging.getLogger("kiln.serve")

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


# ---------------------------------------------------------------------------- generation
async def _generate(state: ServerState, job: Job, rid: str) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of every choice of every prompt; index = prompt index * n + choice index."""
    client = state.client
    if len(job.prompts) == 1:
        async for d in client.generate(job.prompts[0], job.params[0], rid):
            yield d.index, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for d in client.generate(job.prompts[i], job.params[i], f"{rid}-{i}"):
                q.put_nowait((i * job.n + d.index, d))
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


class _Run:
    """One request's generation, run by a producer task at the engine's pace.

    `deltas()` yields (choice index, Delta) as they arrive, and re-raises what ended the
    generation abnormally. The admission slot is released the moment the engine is done with the
    request (or it failed, or was cancelled); `close()` cancels a generation still running, which
    aborts it in the worker. It also keeps the request's metrics."""

    def __init__(self, state: ServerState, job: Job, rid: str, arrival: float, release: Callable[[], None]):
        self.state, self.job, self.rid, self.arrival = state, job, rid, arrival
        self._release = release
        self._q: asyncio.Queue = asyncio.Queue()
        self.last: dict[int, float] = {}
        self.finals: dict[int, CompletionOutput] = {}
        self.generated = 0
        self._done = False
        self._task = asyncio.create_task(self._produce())

    async def _produce(self) -> None:
        try:
            async for idx, d in _generate(self.state, self.job, self.rid):
                self._saw(idx, d)
                self._q.put_nowait((idx, d))
            self._q.put_nowait(None)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            self._q.put_nowait(e)
        finally:
            self._release()

    def _saw(self, idx: int, d: Delta) -> None:
        now = time.monotonic()
        if d.token_ids:
            self.generated += len(d.token_ids)
            self.state.metrics.generation_tokens.inc(len(d.token_ids))
            if idx in self.last:
                self.state.metrics.itl.observe(now - self.last[idx])
            self.last[idx] = now
        if d.output is not None:
            self.finals[idx] = d.output

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        while True:
            item = await self._q.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def usage(self) -> F.Usage:
        cached = sum(o.metrics.num_cached_tokens for i, o in self.finals.items()
                     if o.metrics is not None and i % self.job.n == 0)
        return F.Usage(self.job.prompt_tokens, sum(len(o.token_ids) for o in self.finals.values()), cached)

    async def close(self) -> None:
        """Cancel what still runs (idempotent), then record the request's metrics once."""
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._done:
            return
        self._done = True
        self.state.metrics.finished(self.arrival, self.job.prompt_tokens, self.generated,
                                    list(self.finals.values()), complete=len(self.finals) == self.job.num_choices)
        if self.state.cfg.log_requests:
            for idx, o in sorted(self.finals.items()):
                log.info("request %s choice %d (%s): %r", self.rid, idx, o.finish_reason, o.text)


async def _until_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(coro, receive) -> asyncio.Task | None:
    """Run `coro` unless the client disconnects first, which cancels it. Returns its finished
    task (call .result() for its value or exception), or None if the client left."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.create_task(_until_disconnect(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    return None if work.cancelled() else work


async def _wait_turn(adm, ticket: Ticket, timeout: float, receive) -> bool:
    """Wait for a running slot, or until the client disconnects (returns False)."""
    if ticket.granted:
        return True
    turn = await _unless_gone(adm.wait(ticket, timeout), receive)
    if turn is None:
        return False
    turn.result()  # re-raises TimeoutError or Overloaded
    return True


class _SSE(StreamingResponse):
    """Server-sent events that stop the generation the moment the client leaves."""

    def __init__(self, run: _Run, chunks: AsyncIterator[bytes]):
        super().__init__(chunks, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.run, self.chunks = run, chunks

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_gone(pump(), receive)  # a failed send means the client left too
        finally:
            await self.chunks.aclose()
            await self.run.close()


async def _chunks(state: ServerState, job: Job, run: _Run) -> AsyncIterator[bytes]:
    env = F.Envelope(run.rid, state.cfg.served_model_name, job.chat)
    tok = state.tokenizer
    usage_null = {"usage": None} if job.include_usage else {}
    text_offset: dict[int, int] = {}

    def chunk(choice: dict) -> bytes:
        return F.sse({**env.head(True), "choices": [choice], **usage_null})

    try:
        for idx in range(job.num_choices):
            if job.chat:
                yield chunk({"index": idx, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})
            elif job.echo_texts:
                echo = job.echo_texts[idx // job.n]
                text_offset[idx] = len(echo)
                yield chunk({"index": idx, "text": echo, "logprobs": None, "finish_reason": None})
        async for idx, d in run.deltas():
            if not d.text and d.finish_reason is None and not job.logprobs:
                continue  # held back (partial character or possible stop string)
            lps = d.logprobs or []
            if job.chat:
                lp = F.chat_logprobs(tok, lps, job.top_logprobs) if job.logprobs and lps else None
                c = {"index": idx, "delta": {"content": d.text} if d.text else {}, "logprobs": lp,
                     "finish_reason": d.finish_reason}
            else:
                off = text_offset.get(idx, 0)
                lp = F.completion_logprobs(tok, lps, off) if job.logprobs and lps else None
                text_offset[idx] = off + len(d.text)
                c = {"index": idx, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
            if d.finish_reason is not None:
                c["stop_reason"] = d.output.stop_reason if d.output else None
            yield chunk(c)
        if job.include_usage:
            yield F.sse({**env.head(True), "choices": [], "usage": run.usage().to_dict()})
        yield F.SSE_DONE
    except RequestError as e:
        yield F.sse(error_body(400, str(e), e.param, "invalid_value"))
    except WorkerDied as e:
        yield F.sse(error_body(500, str(e), None, "worker_died"))
    except Exception:  # a bug: the client gets an error event, not a cut connection
        log.exception("request %s failed while streaming", run.rid)
        yield F.sse(error_body(500, "internal server error", None, "internal_error"))


def _body(state: ServerState, job: Job, run: _Run) -> dict:
    env = F.Envelope(run.rid, state.cfg.served_model_name, job.chat)
    tok = state.tokenizer
    choices = []
    for idx in sorted(run.finals):
        o = run.finals[idx]
        if job.chat:
            choices.append(F.chat_choice(tok, o, idx, job.logprobs, job.top_logprobs))
        else:
            prefix = job.echo_texts[idx // job.n] if job.echo_texts else ""
            choices.append(F.completion_choice(tok, o, idx, prefix, job.logprobs))
    return {**env.head(False), "choices": choices, "usage": run.usage().to_dict()}


def _overloaded(state: ServerState, e: Overloaded) -> APIError:
    state.metrics.rejected(e.reason)
    return APIError(503, str(e), None, e.reason, {"Retry-After": RETRY_AFTER_S})


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
    adm = state.admission
    try:
        checked = checked_request(state, body, chat)
    except RequestError:
        m.rejected("invalid")
        raise
    try:
        ticket = adm.enter(checked.seqs, checked.params.priority, checked.min_prompt_tokens)
    except Overloaded as e:
        raise _overloaded(state, e) from None
    try:
        job = await prepare_job(state, body, checked)
        adm.set_tokens(ticket, job.prompt_tokens)
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
        raise _overloaded(state, e) from None
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
    run = _Run(state, job, rid, arrival, lambda: adm.release(ticket))
    if job.stream:
        return _SSE(run, _chunks(state, job, run))
    try:
        finished = await _unless_gone(_drain(run), request.receive)
        if finished is None:
            return Response(status_code=499)  # nobody is listening
        try:
            finished.result()
        except WorkerDied as e:
            raise APIError(500, str(e), None, "worker_died") from None
        return JSONResponse(_body(state, job, run))
    finally:
        await run.close()


async def _drain(run: _Run) -> None:
    async for _ in run.deltas():
        pass

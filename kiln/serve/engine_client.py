"""The API process's handle on the inference worker: spawns it, sends requests, streams deltas back.

Text work (detokenization, stop strings) happens here, on the event loop, off the worker's step
loop. A stop string found here is sent back as `Finish` so the worker frees the blocks. A request
whose consumer stops early (client disconnect, cancellation) is aborted in the worker. If the worker
process dies, every open stream gets `WorkerDied` and `alive` turns False.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import AsyncIterator

import zmq
import zmq.asyncio

from kiln.engine.events import TokenEvent, TokenLogprobs
from kiln.engine.options import EngineOptions
from kiln.engine.output_processor import Delta, OutputProcessor
from kiln.engine.request import FinishReason, Request, choice_ids, choice_requests, choice_seed
from kiln.engine_dir import read_manifest
from kiln.errors import KilnError, RequestError
from kiln.sampling_params import SamplingParams
from kiln.serve import protocol as P
from kiln.tokenizer import Tokenizer

WATCH_INTERVAL_S = 0.1
log = logging.getLogger("kiln.serve")


class WorkerDied(KilnError):
    """The inference worker process exited; in-flight requests cannot finish."""


class EngineClient:
    def __init__(self, engine_dir: str | Path, options: EngineOptions = EngineOptions()):
        self.engine_dir = Path(engine_dir)
        self.options = options
        self.manifest = read_manifest(self.engine_dir)
        m = self.manifest
        self.eos_token_ids = tuple(m.eos_token_ids or m.model.eos_token_ids)
        self.tokenizer = Tokenizer(m.tokenizer_path, m.chat_template, m.special_tokens, self.eos_token_ids)
        self.processor = OutputProcessor(self.tokenizer, self._finish_from_text)
        self.ready: P.Ready | None = None
        self.stats: P.Stats | None = None
        self.alive = False
        self.proc: subprocess.Popen | None = None
        self._ids = itertools.count()
        self._mirrors: dict[str, Request] = {}  # choice id -> the API side's view of it
        self._queues: dict[str, asyncio.Queue] = {}  # choice id -> its group's queue
        self._tasks: list[asyncio.Task] = []
        self._stats_event = asyncio.Event()
        self._pings = itertools.count(1)
        self._ack = 0
        self._aborting = False  # set by abort_all: later requests end at once with "abort"

    # ------------------------------------------------------------------ lifecycle
    async def start(self, timeout: float = 600.0) -> P.Ready:
        self._dir = Path(tempfile.mkdtemp(prefix=P.IPC_DIR_PREFIX))  # 0700: only this user reaches the sockets
        self._ctx = zmq.asyncio.Context()
        self._cmd = self._ctx.socket(zmq.PUSH)
        self._out = self._ctx.socket(zmq.PULL)
        cmd_addr, out_addr = f"ipc://{self._dir}/commands", f"ipc://{self._dir}/outputs"
        self._cmd.bind(cmd_addr)
        self._out.bind(out_addr)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.serve.worker", "--engine-dir", str(self.engine_dir),
             "--commands", cmd_addr, "--outputs", out_addr, "--options", json.dumps(asdict(self.options)),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise WorkerDied(f"inference worker exited with code {self.proc.returncode} while loading")
            if await self._out.poll(int(WATCH_INTERVAL_S * 1000)):
                msg = P.from_worker_decoder.decode(await self._out.recv())
                if isinstance(msg, P.LoadFailed):
                    raise KilnError(f"inference worker could not load the engine: {msg.message}")
                if isinstance(msg, P.Ready):
                    self.ready, self.alive = msg, True
                    break
            if time.monotonic() > deadline:
                self.proc.kill()
                raise WorkerDied(f"inference worker not ready after {timeout:.0f} s")
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watch())]
        return self.ready

    async def close(self, timeout: float = 5.0) -> int | None:
        """Stop the worker (gracefully, then by force) and release sockets; returns its exit code."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                await self._cmd.send(P.encode(P.Shutdown()))
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.alive = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._cmd.close(linger=0)
        self._out.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode if self.proc else None

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Stream the deltas of all choices of one request. Refusals raise RequestError; leaving
        the loop early aborts what is still running."""
        if not self.alive:
            raise WorkerDied("the inference worker is not running")
        rid = request_id or f"cmpl-{next(self._ids)}"
        ids = choice_ids(rid, params.n)
        if any(i in self._mirrors for i in ids):
            raise RequestError(f"request id {rid!r} is already in use", param="request_id")
        base = params.seed if params.seed is not None else secrets.randbits(63)
        now = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        choices = [P.Choice(cid, choice_seed(base, i)) for i, cid in enumerate(ids)]
        try:  # encode first: a value msgpack cannot carry is refused before anything is registered
            message = P.encode(P.AddRequest(list(prompt_ids), params, choices, now))
        except (OverflowError, TypeError, ValueError) as e:
            raise RequestError(f"the request cannot be encoded: {e}") from None
        mirrors = choice_requests([(c.request_id, c.seed) for c in choices], prompt_ids, params,
                                  self.eos_token_ids, now)
        for i, req in enumerate(mirrors):
            self._mirrors[req.request_id] = req
            self._queues[req.request_id] = queue
            self.processor.track(req, i)
        open_ids = set(ids)
        try:
            if self._aborting:  # shutting down past its timeout: end at once, never reach the worker
                for cid in ids:
                    self.processor.abort(cid)
                self._flush_aborted()
            else:
                await self._cmd.send(message)
            while open_ids:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_ids.discard(item.request_id)
                    self._forget(item.request_id)
                yield item
        finally:
            if open_ids:
                self.processor.forget(open_ids)
                for cid in open_ids:
                    self._forget(cid)
                if self.alive:
                    await self._cmd.send(P.encode(P.Abort(sorted(open_ids))))

    async def abort_all(self) -> int:
        """End every open choice now with finish_reason "abort" (graceful shutdown past its
        timeout): the final deltas go to their streams and the worker drops the requests."""
        self._aborting = True
        ids = sorted(self._mirrors)
        for cid in ids:
            self.processor.abort(cid)
        self._flush_aborted()
        if ids and self.alive:
            await self._cmd.send(P.encode(P.Abort(ids)))
        return len(ids)

    def _flush_aborted(self) -> None:
        """Hand the final "abort" deltas the processor holds to their streams."""
        for d in self.processor.process([]):
            q = self._queues.get(d.request_id)
            if q is not None:
                q.put_nowait(d)

    def _forget(self, cid: str) -> None:
        self._mirrors.pop(cid, None)
        self._queues.pop(cid, None)

    def _finish_from_text(self, cid: str, reason: FinishReason, stop: int | str | None) -> None:
        self._cmd.send(P.encode(P.Finish(cid, str(stop))))  # zmq.asyncio: queued without awaiting

    async def fresh_stats(self) -> P.Stats:
        """Stats the worker sends after it has handled everything sent before this call."""
        seq = next(self._pings)
        await self._cmd.send(P.encode(P.Ping(seq)))
        while self._ack < seq:
            if not self.alive:
                raise WorkerDied("the inference worker is not running")
            self._stats_event.clear()
            await self._stats_event.wait()
        return self.stats

    # ------------------------------------------------------------------ background tasks
    async def _output_loop(self) -> None:
        try:
            while True:
                msg = P.from_worker_decoder.decode(await self._out.recv())
                if isinstance(msg, P.StepOutputs):
                    self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here would leave every request hanging: fail loudly instead
            log.exception("kiln: the API side of the engine failed; stopping the worker")
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()  # _watch then ends every stream with WorkerDied

    def _dispatch(self, msg: P.StepOutputs) -> None:
        self.stats, self._ack = msg.stats, msg.ack
        for r in msg.refused:
            q = self._queues.get(r.request_id)
            if q is not None:
                q.put_nowait(RequestError(r.message, param=r.param))
        for t in msg.timings:
            req = self._mirrors.get(t.request_id)
            if req is not None:
                req.first_scheduled_time = t.first_scheduled_time
                req.num_cached_tokens, req.num_preemptions = t.num_cached_tokens, t.num_preemptions
        events = []
        for t in msg.tokens:
            req = self._mirrors.get(t.request_id)
            if req is None:
                continue  # aborted or stopped here already; the worker had one more step in flight
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            reason = FinishReason(t.finish_reason) if t.finish_reason else None
            if reason is not None:
                req.finish_reason, req.stop_reason = reason, t.stop_reason
            lp = TokenLogprobs(t.logprob, [tuple(x) for x in t.top or []]) if t.logprob is not None else None
            events.append(TokenEvent(req, t.token_id, lp, reason))
        for d in self.processor.process(events):
            q = self._queues.get(d.request_id)
            if q is not None:
                q.put_nowait(d)
        self._stats_event.set()

    async def _watch(self) -> None:
        while self.proc.poll() is None:
            await asyncio.sleep(WATCH_INTERVAL_S)
        self.alive = False
        err = WorkerDied(f"the inference worker exited with code {self.proc.returncode}")
        for q in {id(q): q for q in self._queues.values()}.values():  # one per request
            q.put_nowait(err)
        self._stats_event.set()

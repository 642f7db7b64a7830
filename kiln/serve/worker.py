"""The inference worker process: owns the EngineCore and runs its step loop.

`python -m kiln.serve.worker --engine-dir DIR --commands ipc://... --outputs ipc://... --options JSON`

It connects a PULL socket (commands from the API process) and a PUSH socket (outputs to it); the API
process binds both on IPC paths in a private directory. Between steps it takes every pending command
without blocking; when idle it blocks until one arrives. Detokenization and stop strings are the API
process's job, so a step costs only scheduling, the forward pass and sampling. If the API process
goes away, the worker exits (SIGTERM from the kernel's parent-death signal, the parent check every
step, or a send that cannot be delivered) and removes the socket directory its parent left.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import zmq

from kiln.engine.core import EngineCore
from kiln.engine.events import TokenEvent
from kiln.engine.options import EngineOptions
from kiln.engine.request import FinishReason, Request, choice_requests
from kiln.errors import KilnError, RequestError
from kiln.serve import protocol as P

IDLE_POLL_MS = 500  # how often an idle worker checks that its parent is alive
SEND_TIMEOUT_MS = 1000  # a blocked send rechecks that the parent is alive this often
PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, core: EngineCore, commands: zmq.Socket, outputs: zmq.Socket):
        self.core = core
        self.commands = commands
        self.outputs = outputs
        m = core.manifest
        self.eos_token_ids = tuple(m.eos_token_ids or m.model.eos_token_ids)
        self._refused: list[P.Refused] = []
        self._timings: list[P.Timing] = []
        self._stopping = False
        self._step_seconds = 0.0
        self._parent_pid = os.getppid()
        self._ack = 0

    # ------------------------------------------------------------------ commands
    def handle(self, msg: P.ToWorker) -> None:
        if isinstance(msg, P.AddRequest):
            self._add(msg)
        elif isinstance(msg, P.Abort):
            for rid in msg.request_ids:
                self._finished(self.core.abort(rid))
        elif isinstance(msg, P.Finish):
            self._finished(self.core.finish(msg.request_id, FinishReason.STOP, msg.stop))
        elif isinstance(msg, P.Ping):
            self._ack = msg.seq
        elif isinstance(msg, P.Shutdown):
            self._stopping = True

    def _add(self, msg: P.AddRequest) -> None:
        reqs = choice_requests([(c.request_id, c.seed) for c in msg.choices], msg.prompt_token_ids,
                               msg.params, self.eos_token_ids, msg.arrival_time)
        added = []
        try:
            for r in reqs:
                self.core.add_request(r)
                added.append(r.request_id)
        except RequestError as e:
            for rid in added:
                self.core.abort(rid)
            self._refused.append(P.Refused(msg.choices[0].request_id, str(e), e.param))

    def _finished(self, req: Request | None) -> None:
        if req is not None:
            self._timings.append(P.Timing(req.request_id, req.first_scheduled_time, req.first_token_time,
                                          req.finished_time or time.monotonic(), req.num_cached_tokens,
                                          req.num_preemptions))

    def drain_commands(self, block: bool) -> bool:
        """Handle every queued command; when `block`, wait up to IDLE_POLL_MS for the first.
        Returns whether anything arrived."""
        got = False
        if block and not self.commands.poll(IDLE_POLL_MS):
            return False
        while True:
            try:
                raw = self.commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                return got
            got = True
            try:
                self.handle(P.to_worker_decoder.decode(raw))
            except (ValueError, KilnError) as e:  # malformed message: the API process's bug
                print(f"kiln worker: dropped a bad command: {e}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ outputs
    def send(self, events: list[TokenEvent]) -> None:
        tokens = []
        for ev in events:
            lp = ev.logprobs
            reason = ev.finish_reason.value if ev.finish_reason is not None else None
            stop = ev.request.stop_reason if isinstance(ev.request.stop_reason, int) else None
            tokens.append(P.TokenOut(ev.request.request_id, ev.token_id, lp.logprob if lp else None,
                                     lp.top if lp else None, reason, stop))
            if reason is not None:
                self._finished(ev.request)
        s = self.core.scheduler.stats()
        stats = P.Stats(s["running"], s["waiting"], s["free_blocks"], s["total_blocks"], s["kv_usage"],
                        s["preemptions"], s["prefix_queries"], s["prefix_hits"], self.core.num_steps,
                        self._step_seconds)
        msg = P.encode(P.StepOutputs(tokens, self._timings, self._refused, stats, self._ack))
        self._timings, self._refused = [], []
        while True:  # a send blocks once ~1000 messages wait unread: never forever
            try:
                self.outputs.send(msg)
                return
            except zmq.Again:
                if _terminated or os.getppid() != self._parent_pid:
                    self._stopping = True
                    return

    def run(self, parent_pid: int) -> int:
        self._parent_pid = parent_pid
        while not self._stopping:
            busy = self.core.has_unfinished()
            got = self.drain_commands(block=not busy)
            if _terminated or os.getppid() != parent_pid:
                return 0  # orphaned: the API process is gone
            if self.core.has_unfinished():
                t0 = time.perf_counter()
                events = self.core.step()
                self._step_seconds += time.perf_counter() - t0
                self.send(events)
            elif got:
                self.send([])  # refusals, aborts and fresh stats without a step
        return 0


_terminated = False  # set by SIGTERM once orphaned; the step loop stops at its next turn
_parent_pid = -1


def _on_sigterm(signum, frame) -> None:
    global _terminated
    if os.getppid() != _parent_pid:  # orphaned; else the HTTP process drains, then stops us itself
        _terminated = True


def _exit_with_parent(parent_pid: int) -> None:
    """Signals: the HTTP process owns the worker's lifetime. Ctrl-C (SIGINT to the whole process
    group) and a supervisor's SIGTERM to the group are for the HTTP process, which drains and then
    sends Shutdown; the worker ignores them. When the HTTP process dies, the kernel sends SIGTERM
    (Linux parent-death signal) and the loop stops at its next turn; the loop's own parent check
    covers other systems."""
    global _parent_pid
    _parent_pid = parent_pid
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the step loop's parent check still ends the worker


def _remove_ipc_dir(address: str) -> None:
    """The API process makes a private directory for the sockets and removes it on exit; if it
    was killed, the orphaned worker removes it instead."""
    path = Path(address.removeprefix("ipc://")).parent
    if address.startswith("ipc://") and path.name.startswith(P.IPC_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kiln-worker")
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--commands", required=True)
    ap.add_argument("--outputs", required=True)
    ap.add_argument("--options", default="{}", help="EngineOptions as JSON")
    ap.add_argument("--parent-pid", type=int, default=os.getppid())
    args = ap.parse_args(argv)
    _exit_with_parent(args.parent_pid)
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.connect(args.commands)
    outputs = ctx.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    outputs.connect(args.outputs)
    try:
        try:
            core = EngineCore(args.engine_dir, EngineOptions(**json.loads(args.options)))
        except (KilnError, TypeError, ValueError, OSError, RuntimeError) as e:
            outputs.send(P.encode(P.LoadFailed(str(e).splitlines()[0] if str(e) else type(e).__name__)))
            return 1
        m = core.manifest
        s = core.scheduler.config
        outputs.send(P.encode(P.Ready(os.getpid(), m.model.to_dict(), m.profile.max_seq_len, s.max_num_seqs,
                                      core.scheduler.stats()["total_blocks"], m.profile.block_size,
                                      list(m.eos_token_ids or m.model.eos_token_ids), core.load_seconds)))
        return Worker(core, commands, outputs).run(args.parent_pid)
    finally:
        orphaned = os.getppid() != args.parent_pid
        commands.close(linger=0)
        outputs.close(linger=0 if orphaned else 1000)
        ctx.term()
        if orphaned:
            _remove_ipc_dir(args.commands)


if __name__ == "__main__":
    sys.exit(main())

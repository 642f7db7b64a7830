"""The server's lifecycle: load the worker, watch it, drain on SIGTERM, decide the exit code.

Phases: loading -> ready -> draining (SIGTERM) | dead (the worker died or failed to load).
`/ready` answers 200 only when ready; new requests are refused with 503 in every other phase.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.engine.options import EngineOptions
from kiln.quant.recipe import describe
from kiln.serve import protocol as P
from kiln.serve.admission import Admission
from kiln.serve.engine_client import EngineClient
from kiln.serve.metrics import ServerMetrics

log = logging.getLogger("kiln.serve")

DEATH_FLUSH_S = 1.0  # after the worker dies: time for error events to reach clients before exit


@dataclass
class ServeConfig:
    engine_dir: Path
    served_model_name: str
    api_key: str | None = None
    max_num_seqs: int | None = None  # None: the engine profile's max batch size
    max_queue: int = 256
    max_queued_tokens: int = 1 << 20
    request_timeout: float = 600.0  # most seconds a request waits in the queue
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 4 << 20
    cors_origins: list[str] = field(default_factory=list)
    log_requests: bool = False
    metrics_auth: bool = False
    engine_options: EngineOptions = field(default_factory=EngineOptions)


class Phase(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class ServerState:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        opts = dataclasses.replace(cfg.engine_options, prefault_kv_cache=True)  # a flat footprint
        if cfg.max_num_seqs is not None:
            opts = dataclasses.replace(opts, max_num_seqs=cfg.max_num_seqs)
        self.client = EngineClient(cfg.engine_dir, opts)
        self.tokenizer = self.client.tokenizer
        _ = self.tokenizer.max_token_bytes  # computed over the vocabulary once, now, not in a request
        self.phase = Phase.LOADING
        self.admission: Admission | None = None
        self.metrics = ServerMetrics(cfg.served_model_name, self._engine_state)
        self.exit_code = 0
        self.request_exit: Callable[[], None] = lambda: None  # set by the server runner
        self.started_at = time.monotonic()
        self.ready_after: float | None = None  # seconds from start to ready
        self._closing = False
        self._tasks: list[asyncio.Task] = []

    def serving_phase(self) -> Phase:
        """The phase, noticing a dead worker at once (the watcher polls every 100 ms)."""
        if self.phase is Phase.READY and not self.client.alive:
            return Phase.DEAD
        return self.phase

    @property
    def max_seq_len(self) -> int:
        return self.client.ready.max_seq_len if self.client.ready else self.client.manifest.profile.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.client.manifest.model.vocab_size

    def _engine_state(self) -> dict | None:
        s, ready = self.client.stats, self.client.ready
        if ready is None:
            return None  # loading: no engine to report on yet
        if s is None:  # ready, no step yet: an idle engine with every block free
            s = P.Stats(0, 0, ready.total_blocks, ready.total_blocks, 0.0, 0, 0, 0, 0, 0.0)
        queued = self.admission.waiting if self.admission else 0
        return {"running": s.running, "waiting": s.waiting + queued, "kv_usage": s.kv_usage,
                "preemptions": s.preemptions, "prefix_queries": s.prefix_queries,
                "prefix_hits": s.prefix_hits, "free_blocks": s.free_blocks, "total_blocks": s.total_blocks,
                "steps": s.steps, "step_seconds": s.step_seconds}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._boot()))

    async def _boot(self) -> None:
        try:
            ready = await self.client.start()
        except Exception as e:  # LoadFailed, WorkerDied, a bad engine: all end the server
            log.error("kiln: the inference worker failed to start: %s", e)
            self.phase, self.exit_code = Phase.DEAD, 1
            self.request_exit()
            return
        self.admission = Admission(ready.max_num_seqs, self.cfg.max_queue, self.cfg.max_queued_tokens)
        self.ready_after = time.monotonic() - self.started_at
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
        log.info("kiln: ready in %.2f s (engine load %.2f s): model %s, %d KV blocks of %d tokens, "
                 "max %d sequences; quantization: %s", self.ready_after, ready.load_seconds,
                 self.cfg.served_model_name, ready.total_blocks, ready.block_size, ready.max_num_seqs,
                 describe(self.client.manifest.quant))
        while self.client.alive:
            await asyncio.sleep(0.1)
        if self._closing:
            return
        code = self.client.proc.returncode if self.client.proc else None
        log.error("kiln: the inference worker exited (code %s); shutting down", code)
        self.phase, self.exit_code = Phase.DEAD, 1
        await asyncio.sleep(DEATH_FLUSH_S)
        self.request_exit()

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests, let running ones finish within the shutdown timeout."""
        if self.phase in (Phase.DRAINING, Phase.DEAD):
            return
        self.phase = Phase.DRAINING
        log.info("kiln: draining (at most %.0f s)", self.cfg.shutdown_timeout)
        self._tasks.append(asyncio.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        adm = self.admission
        while adm is not None and adm.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if adm is not None and adm.active:
            adm.cancel_waiting()
            n = await self.client.abort_all()
            log.warning("kiln: shutdown timeout: aborted %d running sequences", n)
            until = time.monotonic() + 2.0
            while adm.active and time.monotonic() < until:
                await asyncio.sleep(0.02)
        self.request_exit()

    async def close(self) -> None:
        """Stop the background tasks and the worker (idempotent)."""
        if self._closing:
            return
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client.proc is not None:
            code = await self.client.close()
            if code not in (0, None) and self.exit_code == 0 and self.phase is not Phase.DEAD:
                log.warning("kiln: the inference worker exited with code %s", code)

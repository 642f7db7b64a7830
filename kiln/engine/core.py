"""The engine step: schedule → execute → update. Everything else is a helper around it."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from kiln.engine.events import TokenEvent
from kiln.engine.model_runner import ModelRunner, PendingStep
from kiln.engine.options import EngineOptions
from kiln.engine.request import FinishReason, Request
from kiln.engine.scheduler import Scheduler, SchedulerConfig
from kiln.engine_dir import EngineManifest, read_manifest
from kiln.weight_integrity import verify_weights


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EngineCore:
    def __init__(self, engine_dir: str | Path, options: EngineOptions = EngineOptions()):
        t0 = time.perf_counter()
        self.options = options
        self.manifest: EngineManifest = read_manifest(engine_dir)
        if not options.skip_verify:
            verify_weights(self.manifest)
        profile = self.manifest.profile
        self.runner = ModelRunner(self.manifest, pick_device(options.device),
                                  options.kv_cache_memory, options.kv_cache_fraction,
                                  map_weights=options.map_weights,
                                  prefault_kv_cache=options.prefault_kv_cache,
                                  cuda_graphs=options.cuda_graphs)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=min(options.max_num_seqs or profile.max_batch_size, profile.max_batch_size),
            max_num_tokens=min(options.max_num_tokens or profile.max_num_tokens, profile.max_num_tokens),
            max_seq_len=profile.max_seq_len,
            block_size=profile.block_size,
            num_blocks=self.runner.num_blocks,
            enable_prefix_caching=options.enable_prefix_caching,
        ))
        self.num_steps = 0
        # Overlap (EngineOptions.overlap_steps): the step launched ahead, its tokens not yet read.
        self.overlap = options.overlap_steps if options.overlap_steps is not None else (
            self.runner.graphs is not None)
        self._inflight: PendingStep | None = None
        self.num_ahead_steps = 0  # steps launched before the step before them was read
        # Host seconds of all steps so far, by phase: scheduling; preparing inputs and launching
        # the forward pass and sampler; waiting for the GPU (the sampled tokens); folding the tokens
        # in. All but `wait` are the CPU's own work per step.
        self.step_seconds = dict(schedule=0.0, prepare=0.0, wait=0.0, update=0.0)
        # Objects alive now (the model, tensors, the tokenizer...) live as long as the engine: move
        # them out of the garbage collector's sight, so collections triggered by per-step objects
        # do not walk them (at batch 256 that GC time was most of the sampler metadata's host work).
        gc.collect()
        gc.freeze()
        self.load_seconds = time.perf_counter() - t0

    def add_request(self, req: Request) -> None:
        self.scheduler.add_request(req)

    def abort(self, request_id: str) -> Request | None:
        return self.scheduler.abort(request_id)

    def finish(self, request_id: str, reason: FinishReason, stop_reason: int | str | None = None):
        return self.scheduler.finish(request_id, reason, stop_reason)

    def has_unfinished(self) -> bool:
        if self._inflight is not None and not self.scheduler.has_unfinished:
            # Every row of the step launched ahead has finished or was aborted: nothing of it is
            # left to fold in. Drop it; the device completes it before anything queued later.
            self._inflight = None
        return self.scheduler.has_unfinished

    def step(self) -> list[TokenEvent]:
        """Run one step and return its tokens. With overlap on, the step after it (a decode step
        of the same requests, Scheduler.schedule_ahead) is launched before this step's tokens are
        read, so the GPU runs step N+1 while the host folds in step N and prepares N+2."""
        t0 = time.perf_counter()
        runner, sched = self.runner, self.scheduler
        step, self._inflight = self._inflight, None
        launch_s = 0.0
        if step is None:
            out = sched.schedule()
            if out.is_empty:
                return []
            t = time.perf_counter()
            step = runner.launch(out)
            launch_s += time.perf_counter() - t
        if self.overlap and runner.can_chain(step):
            nxt = sched.schedule_ahead(step.out)
            if nxt is not None:
                t = time.perf_counter()
                self._inflight = runner.launch(nxt, after=step)
                self.num_ahead_steps += 1
                launch_s += time.perf_counter() - t
        t1 = time.perf_counter()
        runner.sync_start = runner.sync_end = 0.0
        result = runner.collect(step)
        t2 = time.perf_counter()
        finished = {r.request_id for r in sched.update(step.out, result.token_ids)}
        t3 = time.perf_counter()
        wait = runner.sync_end - runner.sync_start
        times = self.step_seconds
        times["schedule"] += t1 - t0 - launch_s
        times["prepare"] += launch_s + t2 - t1 - wait
        times["wait"] += wait
        times["update"] += t3 - t2
        self.num_steps += 1
        return [
            TokenEvent(req, tok, lp, req.finish_reason if req.request_id in finished else None)
            for req, tok, lp in zip(step.reqs, result.token_ids, result.logprobs)
        ]

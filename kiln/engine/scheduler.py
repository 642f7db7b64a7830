"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step, schedule() spends a token budget: first on running requests in admission order
(a decode costs 1 token, an unfinished prefill continues in chunks), preempting the most
recently admitted request when the pool runs out of blocks; then it admits waiting requests
in (priority, arrival) order. The runner computes the chunks and samples one token for each
chunk that reaches the end of its request's known tokens; update() folds those in.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.engine.kv_cache_manager import KVCacheManager
from kiln.engine.request import FinishReason, Request, RequestStatus
from kiln.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from kiln.errors import RequestError


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # most requests running at once
    max_num_tokens: int  # token budget of one step
    max_seq_len: int  # prompt + output tokens of one request
    block_size: int
    num_blocks: int  # including the reserved null block 0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_tokens", "max_seq_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2, got {self.num_blocks}")


def _index_of(lst: list[Request], req: Request) -> int:
    for i, r in enumerate(lst):
        if r is req:
            return i
    return -1


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: list[Request] = []  # sorted by self._wkey
        self.running: list[Request] = []  # in admission order (admitted_seq ascending)
        self._wkey: dict[str, tuple[int, int]] = {}
        self._arrival_seq = 0
        self._front_seq = 0  # decreasing: preempted requests go ahead of same-priority arrivals
        self._admit_seq = 0
        self.num_preemptions = 0

    # ---------------------------------------------------------------- intake
    def add_request(self, req: Request) -> None:
        """Queue a request, or refuse it at once with RequestError if it can never be served."""
        cfg = self.config
        n_prompt, n_max = req.num_prompt_tokens, req.params.max_tokens
        if n_prompt == 0:
            raise RequestError("prompt must not be empty", param="prompt")
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use", param="request_id")
        if n_prompt >= cfg.max_seq_len:
            raise RequestError(
                f"prompt ({n_prompt} tokens) is too long: the engine's max sequence length is "
                f"{cfg.max_seq_len}, and at least one token must be generated",
                param="prompt",
            )
        total = n_prompt + n_max
        if total > cfg.max_seq_len:
            raise RequestError(
                f"prompt ({n_prompt} tokens) + max_tokens ({n_max}) = {total} exceeds the engine's "
                f"max sequence length {cfg.max_seq_len}",
                param="max_tokens",
            )
        need = self.kv.blocks_for_tokens(total)
        usable = self.kv.pool.num_usable
        if need > usable:
            raise RequestError(
                f"prompt ({n_prompt} tokens) + max_tokens ({n_max}) = {total} tokens needs {need} "
                f"KV-cache blocks of {cfg.block_size} tokens, but the engine has only {usable}",
                param="max_tokens",
            )
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self._arrival_seq += 1
        self._enqueue(req, (req.params.priority, self._arrival_seq))

    def _enqueue(self, req: Request, key: tuple[int, int]) -> None:
        self._wkey[req.request_id] = key
        keys = [self._wkey[r.request_id] for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, key), req)

    # ---------------------------------------------------------------- properties
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def stats(self) -> dict[str, float | int]:
        pool = self.kv.pool
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "free_blocks": pool.num_free,
            "total_blocks": pool.num_usable,
            "cached_blocks": pool.num_cached,
            "kv_usage": pool.usage,
            "preemptions": self.num_preemptions,
            "prefix_queries": pool.query_tokens,  # tokens of admitted requests looked up
            "prefix_hits": pool.hit_tokens,  # of those, tokens served from the cache
            "prefix_hit_rate": pool.hit_rate,
        }

    # ---------------------------------------------------------------- scheduling
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_tokens

        # 1. Running requests, oldest admission first.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_uncomputed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            scheduled = False
            while True:
                if self.kv.allocate_slots(req, num_new):
                    scheduled = True
                    break
                victim = max(self.running, key=lambda r: r.admitted_seq)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if scheduled:
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
                budget -= num_new
                i += 1
            # else: req was preempted (it was last in the list), the loop ends.

        # 2. Waiting requests, unless this step had to preempt (their blocks would thrash).
        if not out.preempted:
            j = 0
            while j < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[j]
                if self._gated(req):
                    j += 1
                    continue
                hit_blocks, hit_tokens = self.kv.get_computed_prefix(req)
                req.num_computed_tokens = hit_tokens
                num_new = min(req.num_uncomputed_tokens, budget)
                if not self.kv.allocate_slots(req, num_new, hit_blocks):
                    req.num_computed_tokens = 0
                    break  # first come, first served: nobody overtakes it for blocks
                self.kv.pool.record_query(req.num_tokens, hit_tokens)
                del self.waiting[j]
                del self._wkey[req.request_id]
                req.num_cached_tokens = hit_tokens
                req.status = RequestStatus.RUNNING
                self._admit_seq += 1
                req.admitted_seq = self._admit_seq
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                self.running.append(req)
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
                budget -= num_new
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The decode step after `prev`, scheduled while `prev` still runs (its tokens unknown), so
        the host prepares step N+1 during step N. Only when `prev` was a pure decode step of every
        running request and the next normal step would be the same: each request that `prev`
        cannot finish by length decodes one more token. None (schedule normally once `prev` is
        folded in) when a waiting request could be admitted, or the blocks would run out
        (schedule() preempts).

        A request that `prev` finishes by a stop token still computes this step; update() drops
        its token. Its write lands in a slot past its last computed token, in a block that no
        prefix-cache entry covers, and stream order puts it before any later use of the block."""
        cfg = self.config
        if self.waiting and len(self.running) < cfg.max_num_seqs:
            return None
        if not prev.is_decode:
            return None
        chunks = prev.chunks
        scheduled = {id(c.request) for c in chunks}
        if any(id(r) not in scheduled for r in self.running):
            return None
        nxt: list[tuple[Request, int]] = []
        need = 0
        for c in chunks:
            req = c.request
            if req.status != RequestStatus.RUNNING:
                continue  # finished or aborted since
            if req.num_output_tokens + 1 >= req.params.max_tokens or req.num_tokens + 1 >= cfg.max_seq_len:
                continue  # prev's token is its last
            nxt.append((req, c.end))
            need += max(0, self.kv.blocks_for_tokens(c.end + 1) - len(req.block_ids))
        if not nxt or need > self.kv.pool.num_free:
            return None
        out = SchedulerOutput(ahead=True)
        for req, start in nxt:
            self.kv.allocate_slots(req, start + 1 - req.num_computed_tokens)
            out.chunks.append(ScheduledChunk(req, start, 1))
        return out

    def _gated(self, req: Request) -> bool:
        """An n>1 sibling waits until its leader's prompt is computed (and so cached)."""
        lead = req.prefill_leader
        if lead is None or lead is req or lead.is_finished:
            return False
        if lead.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            return True
        return lead.num_computed_tokens < lead.num_prompt_tokens

    def _preempt(self, req: Request) -> None:
        del self.running[_index_of(self.running, req)]
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._front_seq -= 1
        self._enqueue(req, (req.params.priority, self._front_seq))

    # ---------------------------------------------------------------- results
    def update(self, output: SchedulerOutput, sampled: Sequence[int]) -> list[Request]:
        """Apply one step's results; `sampled` has one token per sampling chunk, in order.
        Returns the requests that finished in this step."""
        samples = [c.samples for c in output.chunks]
        if len(sampled) != sum(samples):
            raise ValueError(f"expected {sum(samples)} sampled tokens, got {len(sampled)}")
        finished: list[Request] = []
        k = 0
        for chunk, does_sample in zip(output.chunks, samples):
            req = chunk.request
            token = None
            if does_sample:
                token = int(sampled[k])
                k += 1
            if req.is_finished or req.status != RequestStatus.RUNNING:
                continue  # aborted or finished since schedule()
            req.num_computed_tokens += chunk.num_new_tokens
            self.kv.cache_computed_blocks(req)
            if token is None:
                continue
            req.output_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            reason, stop_reason = self._check_stop(req, token)
            if reason is not None:
                self._finish(req, reason, stop_reason)
                finished.append(req)
        return finished

    def _check_stop(self, req: Request, token: int) -> tuple[FinishReason | None, int | None]:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return FinishReason.STOP, None
            if token in p.stop_token_ids:
                return FinishReason.STOP, token
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_seq_len:
            return FinishReason.LENGTH, None
        return None, None

    def finish(self, request_id: str, reason: FinishReason, stop_reason: int | str | None = None) -> Request | None:
        """End a request wherever it is (waiting, running, preempted); frees its blocks."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, reason, stop_reason)
        return req

    def abort(self, request_id: str) -> Request | None:
        return self.finish(request_id, FinishReason.ABORT)

    def _finish(self, req: Request, reason: FinishReason, stop_reason: int | str | None) -> None:
        i = _index_of(self.running, req)
        if i >= 0:
            del self.running[i]
        else:
            j = _index_of(self.waiting, req)
            if j >= 0:
                del self.waiting[j]
                self._wkey.pop(req.request_id, None)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.finished_time = time.monotonic()
        self.requests.pop(req.request_id, None)

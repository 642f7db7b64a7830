"""Admission control in the API process: how many sequences run, how many requests wait.

A request asks for `seqs` slots (n choices x prompts). It runs at once if the slots are free and
nobody waits ahead of it; otherwise it waits in a priority queue (lower `priority` first, then
arrival order) if the queue has room, or it is refused at once (`Overloaded`, answered 503 with
Retry-After). Refusal needs no tokenization: the queue checks run first, the queued-token budget
against a lower bound of the prompt's length (its bytes over the tokenizer's longest token), and
again with the exact length once the prompt is tokenized (only a request that might fit gets that
far). A waiter that does not get its turn
within the timeout gets `asyncio.TimeoutError` and gives its place back; at shutdown,
`cancel_waiting` refuses everyone still waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


class Overloaded(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # metric label: queue_full | queued_tokens | draining | loading


@dataclass(order=True)
class Ticket:
    priority: int
    seq: int
    seqs: int = field(compare=False)
    tokens: int = field(default=0, compare=False)
    granted: bool = field(default=False, compare=False)
    released: bool = field(default=False, compare=False)
    cancelled: bool = field(default=False, compare=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, compare=False, repr=False)


class Admission:
    def __init__(self, max_running_seqs: int, max_queue: int, max_queued_tokens: int):
        self.max_running_seqs = max_running_seqs
        self.max_queue = max_queue
        self.max_queued_tokens = max_queued_tokens
        self.running_seqs = 0
        self.running_requests = 0
        self.queued_tokens = 0
        self._queue: list[Ticket] = []  # heap of waiting tickets
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests holding a ticket, running or waiting."""
        return self.running_requests + len(self._queue)

    def enter(self, seqs: int, priority: int = 0, min_tokens: int = 0) -> Ticket:
        """Take a running slot or a place in the queue, or raise Overloaded. Never blocks.
        `min_tokens` is a lower bound of the prompt's length, known without tokenizing it."""
        t = Ticket(priority, next(self._seq), seqs)
        if not self._queue and self.running_seqs + seqs <= self.max_running_seqs:
            self._grant(t)
            return t
        if len(self._queue) >= self.max_queue:
            raise Overloaded("queue_full", f"the server is at capacity ({self.running_requests} running, "
                                           f"{len(self._queue)} waiting); retry later")
        if self.queued_tokens >= self.max_queued_tokens or \
                self.queued_tokens + min_tokens > self.max_queued_tokens:
            raise Overloaded("queued_tokens", f"the server's queue would hold more than "
                                              f"{self.max_queued_tokens} prompt tokens; retry later")
        t.tokens = min_tokens  # reserved now, corrected by set_tokens once the prompt is tokenized
        self.queued_tokens += min_tokens
        heapq.heappush(self._queue, t)
        return t

    def set_tokens(self, t: Ticket, tokens: int) -> None:
        """Record a waiting ticket's exact prompt tokens; raises Overloaded past the budget."""
        if t.granted or t.released:
            return
        if self.queued_tokens - t.tokens + tokens > self.max_queued_tokens:
            self.release(t)
            raise Overloaded("queued_tokens", f"the server's queue would hold more than "
                                              f"{self.max_queued_tokens} prompt tokens; retry later")
        self.queued_tokens += tokens - t.tokens
        t.tokens = tokens

    async def wait(self, t: Ticket, timeout: float) -> None:
        """Wait for a running slot; asyncio.TimeoutError after `timeout` seconds (place given back)."""
        if t.granted:
            return
        try:
            await asyncio.wait_for(t._wake.wait(), timeout)
        except BaseException:
            if not t.granted:
                self.release(t)
            raise
        if t.cancelled:
            raise Overloaded("draining", "the server is shutting down")

    def cancel_waiting(self) -> None:
        """Wake every waiter with Overloaded("draining") (shutdown); their places are given back."""
        waiting, self._queue = self._queue, []
        self.queued_tokens = 0
        for t in waiting:
            t.cancelled = t.released = True
            t._wake.set()

    def release(self, t: Ticket) -> None:
        """Give back a ticket's slot or queue place (idempotent), letting waiters in."""
        if t.released:
            return
        t.released = True
        if t.granted:
            self.running_seqs -= t.seqs
            self.running_requests -= 1
        else:
            self._queue.remove(t)
            heapq.heapify(self._queue)
            self.queued_tokens -= t.tokens
        self._admit_waiters()

    def _grant(self, t: Ticket) -> None:
        t.granted = True
        self.running_seqs += t.seqs
        self.running_requests += 1
        t._wake.set()

    def _admit_waiters(self) -> None:
        while self._queue and self.running_seqs + self._queue[0].seqs <= self.max_running_seqs:
            t = heapq.heappop(self._queue)
            self.queued_tokens -= t.tokens
            self._grant(t)

"""One request object from arrival to finish: status, block table, counters."""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from kiln.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its blocks freed, to be recomputed
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the engine's max_seq_len
    ABORT = "abort"


@dataclass
class Request:
    """A single sequence being generated.

    Counters: `num_computed_tokens` of `all_token_ids` have their K/V in the cache;
    `num_cached_tokens` of those came from the prefix cache at admission.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # n > 1: sibling choices wait until this request's prompt blocks are in the prefix cache.
    prefill_leader: "Request | None" = None
    seed: int = 0  # the effective sampling seed (params.seed, or drawn at arrival)
    eos_token_ids: tuple[int, ...] = ()

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    admitted_seq: int = -1  # order of (re)admission into running; preemption picks the largest
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # kiln.engine.sampling_metadata's per-request constants, computed at its first sampled step
    sampling_row: Any = field(default=None, repr=False, compare=False)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens


def choice_seed(seed: int, index: int) -> int:
    """Seed of choice `index` of an n > 1 request: distinct per choice, fixed for a given seed."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def choice_ids(request_id: str, n: int) -> list[str]:
    """Ids of a request's choices: the request id itself when n = 1, else `id-0` ... `id-(n-1)`."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def choice_requests(choices: list[tuple[str, int]], prompt_token_ids: list[int], params: SamplingParams,
                    eos_token_ids: tuple[int, ...], arrival_time: float | None = None) -> list[Request]:
    """One Request per (choice id, seed). Choices after the first wait for the first one's prefill,
    then reuse its prompt blocks from the prefix cache."""
    now = time.monotonic() if arrival_time is None else arrival_time
    reqs: list[Request] = []
    for cid, seed in choices:
        reqs.append(Request(cid, list(prompt_token_ids), params, arrival_time=now,
                            prefill_leader=reqs[0] if reqs else None, seed=seed,
                            eos_token_ids=eos_token_ids))
    return reqs

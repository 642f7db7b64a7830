"""Typed messages between the API process and the inference worker (msgpack via msgspec, never pickle).

API -> worker: `AddRequest` (all choices of one API request), `Abort`, `Finish` (a stop string seen by
the API process's detokenizer), `Ping` (for stats that reflect every earlier command), `Shutdown`.
Worker -> API: `Ready` once loaded, `LoadFailed`, then one `StepOutputs` per engine step (and after
each batch of commands, so refusals and stats arrive without waiting for a step).
"""

from __future__ import annotations

import msgspec

from kiln.sampling_params import SamplingParams

IPC_DIR_PREFIX = "kiln-ipc-"  # the private directory (mode 0700) holding both sockets


class Choice(msgspec.Struct, frozen=True):
    request_id: str
    seed: int


class AddRequest(msgspec.Struct, tag="add", frozen=True):
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[Choice]  # choice 0 prefills first; the others reuse its prompt blocks
    arrival_time: float


class Abort(msgspec.Struct, tag="abort", frozen=True):
    request_ids: list[str]


class Finish(msgspec.Struct, tag="finish", frozen=True):
    request_id: str
    stop: str  # the stop string that ended the choice


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """Asks for a StepOutputs whose `ack` is `seq`, sent after every command before this one."""

    seq: int


ToWorker = AddRequest | Abort | Finish | Shutdown | Ping


class Ready(msgspec.Struct, tag="ready", frozen=True):
    pid: int
    model: dict  # ModelConfig.to_dict()
    max_seq_len: int
    max_num_seqs: int
    total_blocks: int
    block_size: int
    eos_token_ids: list[int]
    load_seconds: float


class LoadFailed(msgspec.Struct, tag="load_failed", frozen=True):
    message: str


class TokenOut(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    finish_reason: str | None
    stop_reason: int | None  # the stop token id that ended it, if one did


class Timing(msgspec.Struct, frozen=True, array_like=True):
    """Sent once for a finished choice (monotonic clock, shared by processes on one host)."""

    request_id: str
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int
    num_preemptions: int


class Refused(msgspec.Struct, frozen=True):
    request_id: str  # the first choice's id
    message: str
    param: str | None


class Stats(msgspec.Struct, frozen=True):
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    kv_usage: float
    preemptions: int
    prefix_queries: int
    prefix_hits: int
    steps: int
    step_seconds: float  # wall time spent in EngineCore.step, all steps together


class StepOutputs(msgspec.Struct, tag="out", frozen=True):
    tokens: list[TokenOut]
    timings: list[Timing]
    refused: list[Refused]
    stats: Stats
    ack: int  # the last Ping handled


FromWorker = Ready | LoadFailed | StepOutputs

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(msg)

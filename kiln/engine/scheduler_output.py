"""What the scheduler decided for one step: the contract between scheduler and model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.request import Request


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + num_new_tokens) of `request.all_token_ids` this step."""

    request: Request
    start: int  # request.num_computed_tokens when scheduled (or, ahead, when the step before ends)
    num_new_tokens: int
    # True when this chunk reaches the end of the known tokens, so a new token is sampled; fixed
    # when scheduled (a chunk scheduled ahead starts at a token not yet sampled: it samples).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.end >= self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Scheduled ahead (Scheduler.schedule_ahead): each chunk's input token is the one the step
    # before samples, still on the device; the requests' host state is one token behind.
    ahead: bool = False

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def is_decode(self) -> bool:
        """A pure decode step: every chunk is one token that samples."""
        return bool(self.chunks) and all(c.num_new_tokens == 1 and c.samples for c in self.chunks)

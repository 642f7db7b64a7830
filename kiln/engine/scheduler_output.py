"""What the scheduler decided for one step: the contract between scheduler and model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.request import Request


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + num_new_tokens) of `request.all_token_ids` this step."""

    request: Request
    start: int  # request.num_computed_tokens when scheduled
    num_new_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a new token is sampled."""
        return self.end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

"""What one engine step reports per request (torch-free: the API process builds these too)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.engine.request import FinishReason, Request


@dataclass
class TokenLogprobs:
    logprob: float
    top: list[tuple[int, float]]  # alternatives, best first


@dataclass
class TokenEvent:
    """A request's new token from one step, and its finish if this step ended it."""

    request: Request
    token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: FinishReason | None

"""Arrival counters for kernels whose last program to arrive finishes the work (decode attention's
split merge, split-K GEMV's sum): zeroed int32 buffers kept between launches (every launch leaves its
counters at zero again, so CUDA-graph replays reuse them), one per kernel and device, made before
any graph capture. One stream at a time: two launches of the same kernel on concurrent streams
would share counters."""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def arrival_counters(kernel: str, device: torch.device, n: int, minimum: int) -> torch.Tensor:
    """At least max(n, minimum) zeroed counters for `kernel` on `device`."""
    buf = _BUFFERS.get((kernel, device))
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, minimum), dtype=torch.int32, device=device)
        _BUFFERS[(kernel, device)] = buf
    return buf

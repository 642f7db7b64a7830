"""The prefill attention kernel's work list, built on the host with numpy (no triton import: the
CPU path builds it too, and triton is only a test dependency there)."""

from __future__ import annotations

import numpy as np

BLOCK_M = 64  # queries per program of kiln.kernels.paged_prefill


def prefill_tiles(q_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's work list for sequences of these query counts: (sequence, first query) of each
    BLOCK_M-query tile, as int32 arrays (host work; the model runner ships them with the step)."""
    q_lens = np.asarray(q_lens, dtype=np.int64)
    counts = -(-q_lens // BLOCK_M)
    seq = np.repeat(np.arange(len(q_lens), dtype=np.int32), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    start = ((np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)) * BLOCK_M)
    return seq, start.astype(np.int32)

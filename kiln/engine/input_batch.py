"""Turn the scheduler's chunks into the flat tensors of one forward pass (host work, numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kiln.model.attention import AttentionMetadata


@dataclass(frozen=True)
class ChunkSpec:
    """The part of one sequence computed this step: tokens [start, start + len(token_ids))."""

    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]
    samples: bool = True  # its last token's logits are needed


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_indices: torch.Tensor  # [S]: the last token of each chunk that samples
    attn: AttentionMetadata


def prepare_inputs(chunks: Sequence[ChunkSpec], block_size: int, device: torch.device,
                   sliding_window: int | None = None) -> ModelInputs:
    """Build inputs for `chunks`; their block tables must cover start + len(token_ids) tokens."""
    lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=len(chunks))
    b, t = len(chunks), int(lens.sum())
    max_q = int(lens.max())
    max_blocks = max(len(c.block_ids) for c in chunks)

    input_ids = np.fromiter((tok for c in chunks for tok in c.token_ids), dtype=np.int64, count=t)
    seq_idx = np.repeat(np.arange(b, dtype=np.int64), lens)
    cu = np.concatenate([[0], np.cumsum(lens)])
    local = np.arange(t, dtype=np.int64) - cu[seq_idx]
    positions = starts[seq_idx] + local

    tables = np.zeros((b, max_blocks), dtype=np.int64)
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_ids)] = c.block_ids
    slots = tables[seq_idx, positions // block_size] * block_size + positions % block_size

    query_pos = np.zeros((b, max_q), dtype=np.int64)
    query_pos[seq_idx, local] = positions
    query_index = seq_idx * max_q + local

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    attn = AttentionMetadata(
        slot_mapping=dev(slots),
        block_tables=dev(tables),
        seq_lens=dev(starts + lens),
        query_pos=dev(query_pos),
        query_index=dev(query_index),
        max_q=max_q,
        max_kv=max_blocks * block_size,
        sliding_window=sliding_window,
    )
    samples = np.fromiter((c.samples for c in chunks), dtype=bool, count=b)
    return ModelInputs(dev(input_ids), dev(positions), dev((cu[1:] - 1)[samples]), attn)

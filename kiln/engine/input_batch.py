"""Turn the scheduler's chunks into the flat tensors of one forward pass (host work, numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kiln.kernels.prefill_tiles import prefill_tiles
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


class HostStaging:
    """Ships a step's integer inputs to the device in one copy: they are packed into one pinned
    host buffer (kept and grown across steps) and copied with one non-blocking transfer, as int32,
    the CUDA graphs' input type, so that eager steps launch the very kernel variants the graphs
    compiled at load. On the CPU the numpy (int64) arrays are used as they are (no copy at all).

    The buffer is rewritten only after the previous step's copy has finished (an event), so a step
    that ends without a host synchronization (a prompt chunk that samples nothing) is safe too.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buf: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return [torch.from_numpy(a) for a in arrays]
        total = sum(-(-a.size // 4) * 4 for a in arrays)
        if self._copied is not None:
            self._copied.synchronize()
        if self._buf is None or self._buf.numel() < total:
            self._buf = torch.empty(max(total, 2 * (0 if self._buf is None else self._buf.numel()), 4096),
                                    dtype=torch.int32, pin_memory=True)
        host = self._buf.numpy()
        offsets = [0]
        for a in arrays:
            host[offsets[-1]:offsets[-1] + a.size] = a.ravel()
            # each array 16-byte aligned: Triton specializes (and compiles) kernels per pointer alignment
            offsets.append(offsets[-1] + -(-a.size // 4) * 4)
        dev = self._buf[:offsets[-1]].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return [dev[o:o + a.size].view(a.shape) for o, a in zip(offsets, arrays)]


def prepare_inputs(chunks: Sequence[ChunkSpec], block_size: int, device: torch.device,
                   sliding_window: int | None = None, staging: HostStaging | None = None) -> ModelInputs:
    """Build inputs for `chunks`; their block tables must cover start + len(token_ids) tokens."""
    lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=len(chunks))
    b, t = len(chunks), int(lens.sum())
    max_q = int(lens.max())
    max_blocks = max(len(c.block_ids) for c in chunks)
    if device.type == "cuda":  # a table row stride divisible by 16, as in the graphs: Triton compiles
        max_blocks = -(-max_blocks // 16) * 16  # a kernel variant per stride class, mid-run otherwise

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
    tile_seq, tile_start = prefill_tiles(lens)
    samples = np.fromiter((c.samples for c in chunks), dtype=bool, count=b)

    (ids_d, pos_d, logits_d, slots_d, tables_d, lens_d, qpos_d, qidx_d, cu_d, tseq_d,
     tstart_d) = (staging or HostStaging(device)).upload([
        input_ids, positions, (cu[1:] - 1)[samples], slots, tables, starts + lens, query_pos,
        query_index, cu, tile_seq.astype(np.int64), tile_start.astype(np.int64)])
    attn = AttentionMetadata(
        slot_mapping=slots_d, block_tables=tables_d, seq_lens=lens_d, query_pos=qpos_d,
        query_index=qidx_d, max_q=max_q, max_kv=max_blocks * block_size,
        sliding_window=sliding_window, query_start=cu_d, tile_seq=tseq_d, tile_start=tstart_d,
        fresh=b == 1 and int(starts[0]) == 0,
    )
    return ModelInputs(ids_d, pos_d, logits_d, attn)

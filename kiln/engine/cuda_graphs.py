"""Decode steps as CUDA graph replays, one graph per batch bucket of the engine's shape profile.

A decode step (one new token per sequence) has the same kernels with the same shapes every time
for a given batch size, so its whole forward pass, logits included, is captured once at load and
replayed with a single launch: no Python, no per-kernel launch cost. A step of n sequences replays
the graph of the smallest bucket >= n; the padding rows decode token 0 at position 0 into the null
block's slot 0 (block 0 is never handed out, see BlockPool) over a context of one token, so they
are finite, cheap and invisible.

Inputs live in one device buffer, refilled each step by one host-to-device copy from one pinned
staging buffer, laid out per bucket B as int32 (`layout`; each field padded to 16 bytes)
    [token ids (B) | positions (B) | cache slots (B) | context lengths (B) | block tables (B x W)]
with W = the profile's blocks per sequence, the full table width, so that any context up to
max_seq_len fits every captured graph. The attention kernel splits each sequence's context by its
real length (kiln.kernels.paged_decode), so the wide table costs nothing.

The graph ends with the logits' argmax: a step whose rows are all plain greedy (no logprobs, no
penalties, nothing suppressed) takes its tokens from there, with no sampler launch at all. Other
steps run the sampler outside the graph on the replay's logits: its work depends on the requests'
sampling parameters.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from kiln.model.attention import AttentionMetadata, attention_context
from kiln.model.llama import LlamaModel

_FIELDS = 4  # ids, positions, slots, lengths
_ALIGN = 4  # int32s: every field starts 16 bytes aligned (Triton specializes kernels on pointer alignment)


def layout(b: int, width: int) -> tuple[int, int]:
    """(field stride, total int32s) of bucket b's inputs: field f at f * stride, tables after."""
    stride = -(-b // _ALIGN) * _ALIGN
    return stride, _FIELDS * stride + b * width


def fill_inputs(h: np.ndarray, b: int, width: int, block_size: int, token_ids: Sequence[int],
                positions: Sequence[int], block_tables: Sequence[Sequence[int]]) -> None:
    """Write one decode step of n <= b sequences into staging buffer `h` in bucket b's layout
    (module docstring); rows [n, b) become padding: token 0 at position 0, slot 0 of the null
    block, context length 1, an all-null block table."""
    n = len(token_ids)
    s, size = layout(b, width)
    pos = np.asarray(positions, dtype=np.int64)
    tab = h[_FIELDS * s:size].reshape(b, width)
    tab[:] = 0
    for i, blocks in enumerate(block_tables):
        tab[i, :len(blocks)] = blocks
    h[:n] = token_ids
    h[s:s + n] = pos
    h[2 * s:2 * s + n] = tab[np.arange(n), pos // block_size] * block_size + pos % block_size
    h[3 * s:3 * s + n] = pos + 1
    for f in range(_FIELDS):
        h[f * s + n:f * s + b] = 1 if f == 3 else 0


class DecodeGraphs:
    def __init__(self, model: LlamaModel, rope_table: torch.Tensor, kv_caches: torch.Tensor,
                 batch_sizes: Sequence[int], table_width: int, block_size: int):
        self.model = model
        self.rope_table = rope_table
        self.kv_caches = kv_caches
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.width = table_width
        self.block_size = block_size
        device = kv_caches.device
        n = layout(self.max_batch, table_width)[1]
        self._host = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(n, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def _views(self, b: int) -> tuple[torch.Tensor, ...]:
        d = self._dev
        s, size = layout(b, self.width)
        ids, pos, slots, lens = (d[i * s:i * s + b] for i in range(_FIELDS))
        tables = d[_FIELDS * s:size].view(b, self.width)
        return ids, pos, slots, lens, tables

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos, slots, lens, tables = self._views(b)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=lens,
                                 query_pos=None, query_index=None, max_q=1,
                                 max_kv=self.width * self.block_size)
        with attention_context(meta):
            hidden = self.model(ids, pos, self.rope_table, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return logits, logits.argmax(dim=-1)  # the greedy tokens, for steps that need nothing else

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket's graph (largest first, all in one memory pool); returns seconds."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        pool = None
        with torch.cuda.stream(stream):
            for b in reversed(self.batch_sizes):
                fill_inputs(self._host_np, b, self.width, self.block_size, [], [], [])
                size = layout(b, self.width)[1]
                self._dev[:size].copy_(self._host[:size])
                self._forward(b)  # compiles the Triton kernels, warms cuBLAS for these shapes
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits, greedy = self._forward(b)
                pool = graph.pool()
                self._graphs[b] = (graph, logits, greedy)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        return self.capture_seconds

    def bucket(self, n: int) -> int | None:
        for b in self.batch_sizes:
            if b >= n:
                return b
        return None

    def run(self, token_ids: Sequence[int], positions: Sequence[int],
            block_tables: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of n = len(token_ids) sequences (n <= max_batch); each block table
        covers position + 1 tokens. Returns the logits [n, vocab] (float32) and their argmax [n],
        valid until the next replay. The staging buffer is reused, so the caller must have waited for the previous
        step (the model runner does: it reads each step's sampled tokens)."""
        n = len(token_ids)
        b = self.bucket(n)
        fill_inputs(self._host_np, b, self.width, self.block_size, token_ids, positions, block_tables)
        size = layout(b, self.width)[1]
        self._dev[:size].copy_(self._host[:size], non_blocking=True)
        graph, logits, greedy = self._graphs[b]
        graph.replay()
        return logits[:n], greedy[:n]

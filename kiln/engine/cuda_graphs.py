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

`PrefillGraphs` does the same for a step that is one sequence's prompt (or prompt chunk, or the
tail after a prefix-cache hit) of up to 2048 tokens: one graph per token bucket
(ShapeProfile.graph_prefill_tokens), padded with null-slot tokens that no real token attends to.
A short prompt's prefill is otherwise bound by launching ~300 kernels from Python, not by the GPU.
"""

from __future__ import annotations

import abc
import time
from typing import Sequence

import numpy as np
import torch

from kiln.kernels.prefill_tiles import BLOCK_M as PREFILL_BLOCK_M
from kiln.model.attention import AttentionMetadata, attention_context
from kiln.model.llama import LlamaModel

_FIELDS = 4  # ids, positions, slots, lengths
_ALIGN = 4  # int32s: every field starts 16 bytes aligned (Triton specializes kernels on pointer alignment)


def _pad(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Staging:
    """One pinned host buffer and its device twin; a refill waits for the previous upload."""

    def __init__(self, n: int, device: torch.device):
        self.host = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self.np = self.host.numpy()
        self.dev = torch.zeros(n, dtype=torch.int32, device=device)
        self._copied: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def upload(self, n: int) -> None:
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()


class _BucketGraphs(abc.ABC):
    """What both graph sets share: one staging buffer sized for the largest bucket, one graph per
    key (a bucket, or a bucket and a variant) captured at load, and the replay of a step padded up
    to its bucket. A subclass gives `_size` (int32s of a key's inputs), `_fill` (write a step into
    the staging buffer), `_EMPTY` (the arguments of a do-nothing step, for capture), `_forward`
    (the captured work) and, with variants, `_keys`."""

    _EMPTY: tuple = ()

    def __init__(self, model: LlamaModel, rope_table: torch.Tensor, kv_caches: torch.Tensor,
                 buckets: Sequence[int], table_width: int, block_size: int):
        self.model = model
        self.rope_table = rope_table
        self.kv_caches = kv_caches
        self.buckets = tuple(sorted(buckets))
        self.width = table_width
        self.block_size = block_size
        self._buf = _Staging(max(self._size(k) for k in self._keys()), kv_caches.device)
        self._graphs: dict = {}  # key -> (graph, logits, argmax)
        self.pool = None
        self.capture_seconds = 0.0

    def _keys(self) -> list:
        return list(self.buckets)

    @abc.abstractmethod
    def _size(self, key) -> int:
        """int32s of this key's inputs in the staging buffer."""

    @abc.abstractmethod
    def _fill(self, key, *step) -> None:
        """Write one step into the staging buffer in this key's layout."""

    @abc.abstractmethod
    def _forward(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured work over the staged inputs: (logits, argmax)."""

    @torch.inference_mode()
    def capture(self, pool=None) -> float:
        """Capture every bucket's graph (largest first, all in one memory pool, `pool` when given),
        each after one eager run (Triton compiles, cuBLAS picks its kernels); returns seconds."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self._keys()):
                self._fill(b, *self._EMPTY)
                self._buf.upload(self._size(b))
                self._forward(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    outputs = self._forward(b)
                pool = graph.pool()
                self._graphs[b] = (graph, *outputs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.pool = pool
        self.capture_seconds = time.perf_counter() - t0
        return self.capture_seconds

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _replay(self, b: int, *step, device_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage `step` in bucket b's layout (once the previous upload is done), ship it, replay;
        returns the graph's (logits, argmax), valid until the next replay. `device_ids` (already
        on the device, e.g. the step before's sampled tokens) replace the first token ids: every
        layout starts with the token ids."""
        self._buf.wait()
        self._fill(b, *step)
        self._buf.upload(self._size(b))
        if device_ids is not None:
            self._buf.dev[:device_ids.numel()].copy_(device_ids)
        graph, logits, greedy = self._graphs[b]
        graph.replay()
        return logits, greedy


def layout(b: int, width: int) -> tuple[int, int]:
    """(field stride, total int32s) of bucket b's inputs: field f at f * stride, tables after."""
    stride = _pad(b)
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


class DecodeGraphs(_BucketGraphs):
    """Decode steps as graph replays, one per batch bucket (module docstring)."""

    _EMPTY = ([], [], [])

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return self.buckets

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _size(self, b: int) -> int:
        return layout(b, self.width)[1]

    def _fill(self, b: int, token_ids, positions, block_tables) -> None:
        fill_inputs(self._buf.np, b, self.width, self.block_size, token_ids, positions, block_tables)

    def _views(self, b: int) -> tuple[torch.Tensor, ...]:
        d = self._buf.dev
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

    def run(self, token_ids: Sequence[int], positions: Sequence[int],
            block_tables: Sequence[Sequence[int]], device_ids: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of n = len(token_ids) sequences (n <= max_batch); each block table
        covers position + 1 tokens. `device_ids` [n], when given, are the token ids instead
        (`token_ids` then only counts the rows). Returns the logits [n, vocab] (float32) and their
        argmax [n], valid until the next replay."""
        n = len(token_ids)
        logits, greedy = self._replay(self.bucket(n), token_ids, positions, block_tables,
                                      device_ids=device_ids)
        return logits[:n], greedy[:n]


def prefill_layout(t: int, width: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Bucket t's input fields {name: (offset, length)} in int32s, each 16-byte aligned, and the
    total: token ids, positions, slots (t each); the context length; query starts [0, n]; the
    attention tiles (sequence, first query: t / BLOCK_M each); the logits row; the block table."""
    tiles = -(-t // PREFILL_BLOCK_M)
    fields, off = {}, 0
    for name, n in (("ids", t), ("pos", t), ("slots", t), ("len", 1), ("qs", 2), ("tseq", tiles),
                    ("tstart", tiles), ("row", 1), ("table", width)):
        fields[name] = (off, n)
        off += _pad(n)
    return fields, off


def fill_prefill(h: np.ndarray, t: int, width: int, block_size: int, token_ids: Sequence[int],
                 start: int, block_ids: Sequence[int]) -> None:
    """Write one sequence's n <= t new tokens at positions start.. into bucket t's layout; rows
    [n, t) are padding (token 0 at position 0 into the null block's slot 0, attended by nothing;
    their tiles start past the sequence's queries, so they do no work)."""
    f, _ = prefill_layout(t, width)
    n = len(token_ids)

    def put(name: str) -> np.ndarray:
        o, k = f[name]
        return h[o:o + k]

    table = put("table")
    table[:] = 0
    table[:len(block_ids)] = block_ids
    pos = np.arange(start, start + n, dtype=np.int64)
    put("ids")[:n] = token_ids
    put("pos")[:n] = pos
    put("slots")[:n] = table[pos // block_size] * block_size + pos % block_size
    for name in ("ids", "pos", "slots"):
        put(name)[n:] = 0
    put("len")[0] = start + n
    put("qs")[:] = (0, n)
    put("tseq")[:] = 0
    put("tstart")[:] = np.arange(f["tstart"][1], dtype=np.int64) * PREFILL_BLOCK_M
    put("row")[0] = max(n - 1, 0)


FRESH_MIN_TOKENS = 512  # buckets from here on get a second graph for fresh prompts (SDPA flash)


class PrefillGraphs(_BucketGraphs):
    """Single-sequence prefill steps as graph replays, one per token bucket (module docstring).
    Buckets of FRESH_MIN_TOKENS and more have a second graph for a fresh prompt (from position 0,
    AttentionMetadata.fresh), whose attention is causal SDPA instead of the paged kernel; keys are
    (bucket, fresh)."""

    _EMPTY = ([0], 0, [])

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def _keys(self) -> list:
        return ([(t, False) for t in self.buckets]
                + [(t, True) for t in self.buckets if t >= FRESH_MIN_TOKENS])

    def _size(self, key) -> int:
        return prefill_layout(key[0], self.width)[1]

    def _fill(self, key, token_ids, start, block_ids) -> None:
        fill_prefill(self._buf.np, key[0], self.width, self.block_size, token_ids, start, block_ids)

    def _forward(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        t, fresh = key
        f, _ = prefill_layout(t, self.width)
        d = self._buf.dev
        v = {name: d[o:o + k] for name, (o, k) in f.items()}
        meta = AttentionMetadata(slot_mapping=v["slots"], block_tables=v["table"].view(1, self.width),
                                 seq_lens=v["len"], query_pos=None, query_index=None, max_q=t,
                                 max_kv=self.width * self.block_size, query_start=v["qs"],
                                 tile_seq=v["tseq"], tile_start=v["tstart"], fresh=fresh)
        with attention_context(meta):
            hidden = self.model(v["ids"], v["pos"], self.rope_table, self.kv_caches)
        logits = self.model.compute_logits(hidden.index_select(0, v["row"]))
        return logits, logits.argmax(dim=-1)

    def run(self, token_ids: Sequence[int], start: int, block_ids: Sequence[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute tokens [start, start + n) of one sequence (its earlier tokens' K/V are in the
        cache; its block table covers start + n tokens). Returns the logits of its last token
        [1, vocab] (float32) and their argmax [1], valid until the next replay."""
        t = self.bucket(len(token_ids))
        return self._replay((t, start == 0 and t >= FRESH_MIN_TOKENS), token_ids, start, block_ids)

"""The Triton prefill/extend attention kernel against an independent float64 reference.

Batches mix what a step can hold: a whole new prompt, a chunk continuing a prompt, the tail after a
prefix-cache hit, and single decode tokens, over shuffled cache blocks; GQA ratios 1, 4 and 8, head
dims 64 and 128, lengths on and next to block and tile boundaries, and a sliding window. Without a
GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from kiln.kernels.prefill_tiles import BLOCK_M, prefill_tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16


def reference(q, k_cache, v_cache, tables, seq_lens, q_lens, scale, window=None):
    """Per sequence and query: softmax over its allowed keys, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    row = 0
    for b, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        blocks = tables[b][: (n + BS - 1) // BS]
        k = torch.cat([k_cache[i] for i in blocks])[:n].double().repeat_interleave(heads // kv_heads, 1)
        v = torch.cat([v_cache[i] for i in blocks])[:n].double().repeat_interleave(heads // kv_heads, 1)
        for i in range(ql):
            pos = n - ql + i
            keys = torch.arange(n)
            ok = keys <= pos
            if window is not None:
                ok &= pos - keys < window
            s = torch.einsum("hd,nhd->hn", q[row].double(), k) * scale
            s[:, ~ok] = float("-inf")
            out[row] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
            row += 1
    return out


CASES = [  # (seq_lens, q_lens, heads, kv_heads, head_dim)
    ([40, 16, 17, 70], [40, 16, 1, 6], 4, 4, 64),  # MHA: new prompt, exact block, decode, prefix-hit tail
    ([130, 33, 5], [66, 33, 5], 8, 2, 64),  # GQA 4: a chunk after 64 cached tokens; tiles past BLOCK_M
    ([70, 31, 64], [1, 31, 64], 8, 1, 128),  # GQA 8, head dim 128
    ([48], [48], 16, 2, 128),
]


def make(seq_lens, heads, kv_heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = [(n + BS - 1) // BS for n in seq_lens]
    num_blocks = sum(widths) + 4
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # shuffled, never block 0
    tables, i = [], 0
    for w in widths:
        tables.append(perm[i:i + w])
        i += w
    width = max(widths) + 1  # a padding column, as the runner's tables have
    bt = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, t in enumerate(tables):
        bt[b, :len(t)] = torch.tensor(t)
    kc = torch.randn(num_blocks, BS, kv_heads, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, BS, kv_heads, d, generator=g).to(dtype)
    return tables, bt, kc, vc


@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads,d", CASES)
@pytest.mark.parametrize("window", [None, 20])
def test_matches_reference(seq_lens, q_lens, heads, kv_heads, d, window):
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    tables, bt, kc, vc = make(seq_lens, heads, kv_heads, d, dtype)
    t = sum(q_lens)
    q = torch.randn(t, heads, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = reference(q, kc, vc, tables, seq_lens, q_lens, d ** -0.5, window)
    tile_seq, tile_start = prefill_tiles(np.array(q_lens))
    qs = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    dev = lambda x: torch.as_tensor(x).to(DEVICE)  # noqa: E731
    got = paged_prefill_attention(dev(q), dev(kc), dev(vc), dev(bt), dev(torch.tensor(seq_lens, dtype=torch.int32)),
                                  dev(qs), dev(tile_seq), dev(tile_start), d ** -0.5, window).cpu()
    assert got.shape == q.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_tiles_cover_every_query_once():
    q_lens = [1, BLOCK_M, BLOCK_M + 1, 3 * BLOCK_M - 1, 7]
    seq, start = prefill_tiles(np.array(q_lens))
    covered = {(b, m) for b, s in zip(seq.tolist(), start.tolist()) for m in range(s, min(s + BLOCK_M, q_lens[b]))}
    assert covered == {(b, m) for b, n in enumerate(q_lens) for m in range(n)}
    assert len(seq) == sum(-(-n // BLOCK_M) for n in q_lens)


@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads,d", CASES[:2])
def test_fp8_cache_matches_reference_on_its_values(seq_lens, q_lens, heads, kv_heads, d):
    """An fp8 cache with per-layer k and v scales, against float64 attention over the values its
    codes stand for."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    tables, bt, kc, vc = make(seq_lens, heads, kv_heads, d, dtype, seed=3)
    ks, vs = 0.02, 0.009
    kq = (kc.float() * 3 / ks).clamp(-448, 448).to(torch.float8_e4m3fn)
    vq = (vc.float() * 3 / vs).clamp(-448, 448).to(torch.float8_e4m3fn)
    t = sum(q_lens)
    q = torch.randn(t, heads, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = reference(q, kq.double() * ks, vq.double() * vs, tables, seq_lens, q_lens, d ** -0.5)
    tile_seq, tile_start = prefill_tiles(np.array(q_lens))
    qs = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    dev = lambda x: torch.as_tensor(x).to(DEVICE)  # noqa: E731
    got = paged_prefill_attention(dev(q), dev(kq), dev(vq), dev(bt), dev(torch.tensor(seq_lens, dtype=torch.int32)),
                                  dev(qs), dev(tile_seq), dev(tile_start), d ** -0.5, kv_scales=(ks, vs)).cpu()
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)

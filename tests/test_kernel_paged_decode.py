"""The Triton paged-decode kernel against an independent float64 reference.

On a machine without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here
before triton is imported), which is how CI tests it. Shapes cover GQA ratios 1, 4 and 8, head
dims 64 and 128, ragged lengths, lengths on and next to block boundaries, and 1 to many splits.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.kernels.paged_decode import num_splits_for, paged_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16


def reference(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Per sequence: gather its keys and values block by block, softmax in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        blocks = block_tables[b, : (n + BS - 1) // BS].tolist()
        k = torch.cat([k_cache[i] for i in blocks])[:n].double()  # [n, kv_heads, d]
        v = torch.cat([v_cache[i] for i in blocks])[:n].double()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


def make(seq_lens, heads, kv_heads, d, dtype, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    max_blocks = max((n + BS - 1) // BS for n in seq_lens) + 1  # one more: padding columns exist
    perm = torch.randperm(num_blocks - 1, generator=g)[: b * max_blocks] + 1  # shuffled, never block 0
    block_tables = perm.view(b, max_blocks).to(torch.int32)
    k_cache = torch.randn(num_blocks, BS, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BS, kv_heads, d, generator=g).to(dtype)
    q = torch.randn(b, heads, d, generator=g).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


CASES = [  # (seq_lens, heads, kv_heads, head_dim)
    ([1, 16, 17, 40], 4, 4, 64),  # MHA; a single token, exactly one block, one past a boundary
    ([33, 5, 64], 8, 2, 64),  # GQA 4
    ([70, 31], 8, 1, 128),  # GQA 8 (MQA-like), head dim 128
    ([48], 16, 2, 128),
]


@pytest.mark.parametrize("seq_lens,heads,kv_heads,d", CASES)
@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("min_split", [1, 20])  # 20: the shorter contexts use fewer splits
def test_matches_reference(seq_lens, heads, kv_heads, d, splits, min_split):
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    q, kc, vc, bt, sl = make(seq_lens, heads, kv_heads, d, dtype)
    want = reference(q, kc, vc, bt, sl, d ** -0.5)
    got = paged_decode_attention(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), bt.to(DEVICE), sl.to(DEVICE),
                                 d ** -0.5, num_splits=splits, min_split_tokens=min_split).cpu()
    assert got.shape == q.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_matches_the_engines_own_reference_path():
    """The same numbers as paged_attention_ref, the CPU path the kernel replaces on the GPU."""
    from kiln.model.attention import AttentionMetadata, paged_attention_ref

    q, kc, vc, bt, sl = make([9, 40, 23], 8, 2, 64, torch.float32, seed=3)
    b, max_blocks = bt.shape
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(b, dtype=torch.int64), block_tables=bt.long(), seq_lens=sl.long(),
        query_pos=(sl.long() - 1)[:, None], query_index=torch.arange(b), max_q=1, max_kv=max_blocks * BS)
    want = paged_attention_ref(q, kc, vc, meta, 0.125)
    got = paged_decode_attention(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), bt.to(DEVICE), sl.to(DEVICE),
                                 0.125).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_split_count():
    assert num_splits_for(batch=1, kv_heads=32, max_blocks=256) == 8
    assert num_splits_for(batch=256, kv_heads=8, max_blocks=256) == 1
    assert num_splits_for(batch=1, kv_heads=1, max_blocks=4) == 4


def test_split_merge_leaves_its_arrival_counters_at_zero():
    """The last split to arrive merges and resets its counter: a second launch (a CUDA-graph
    replay reuses the same counters) sees zeros and gives the same output."""
    from kiln.kernels.paged_decode import _arrival_counters

    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    q, kc, vc, bt, sl = (t.to(DEVICE) for t in make([70, 9, 33], 8, 2, 64, dtype, seed=3))
    first = paged_decode_attention(q, kc, vc, bt, sl, 0.125, num_splits=4, min_split_tokens=8)
    assert not _arrival_counters(q.device, 0).any()
    again = paged_decode_attention(q, kc, vc, bt, sl, 0.125, num_splits=4, min_split_tokens=8)
    assert torch.equal(first, again)


def fp8_cache(cache, scale):
    """E4M3 codes of cache / scale (saturated) and the values they stand for, in float64."""
    codes = (cache.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, codes.double() * scale


@pytest.mark.parametrize("seq_lens,heads,kv_heads,d", CASES[:3])
@pytest.mark.parametrize("splits", [1, None])
def test_fp8_cache_matches_reference_on_its_values(seq_lens, heads, kv_heads, d, splits):
    """An fp8 cache: codes with per-layer k and v scales, against float64 attention over the values
    the codes stand for (the kernel converts them to q's dtype and folds both scales in)."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    q, kc, vc, bt, sl = make(seq_lens, heads, kv_heads, d, dtype, seed=5)
    ks, vs = 0.013, 0.0071  # codes up to ~300 and ~560 (saturated): both ranges exercised
    kq, kval = fp8_cache(kc * 4, ks)
    vq, vval = fp8_cache(vc * 4, vs)
    want = reference(q, kval, vval, bt, sl, d ** -0.5)
    got = paged_decode_attention(q.to(DEVICE), kq.to(DEVICE), vq.to(DEVICE), bt.to(DEVICE), sl.to(DEVICE),
                                 d ** -0.5, num_splits=splits, kv_scales=(ks, vs)).cpu()
    assert got.dtype == q.dtype and torch.isfinite(got).all()
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="kv_scales"):
        paged_decode_attention(q.to(DEVICE), kq.to(DEVICE), vq.to(DEVICE), bt.to(DEVICE), sl.to(DEVICE), 1.0)

"""Paged-attention decode in Triton: one new query token per sequence, GQA-aware, split along the
sequence (flash-decoding).

Program (b, kv_head, split) reads its share of sequence b's context from the paged cache through
the block table, TILE_TOKENS tokens (several blocks) at a time, once for all G = heads / kv_heads
query heads that share the kv head: the scores and the weighted values are `tl.dot`s of the head
group (padded to 16 rows) against the tile, on tensor cores. It keeps an online softmax (running
max m, sum l, weighted values acc) in float32. A second kernel merges the
splits. Splits let a batch-1 long-context decode use the whole GPU; with one split the merge is a
rescale. Each sequence spreads its own context over the splits (computed on the device from its
length), so no split idles on block-table padding. No host synchronization and fixed grid shapes for
a given batch size, split count and table width, so the launch can be captured in a CUDA graph.

The torch reference (`paged_attention_ref` in kiln/model/attention.py) is the CPU path and the
oracle of the tests, which run this kernel on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.paged_tile import dot, load_tile, online_softmax_step, tile_slots


@triton.jit
def _decode_split_kernel(
    Q, K, V, BT, SL, ACC, ML,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh, stride_ms,
    scale, num_splits,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    TILE: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SL + b).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    heads = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(K.dtype.element_ty)  # [BLOCK_G, BLOCK_D]: padded rows are 0
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # Each sequence divides its own context among the splits (whole tiles each), so a split's
    # work follows the real length, not the block table's padded width: the grid can stay fixed
    # for a CUDA graph while lengths change from step to step.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), TILE) * TILE
    first = split * per_split
    last = tl.minimum(first + per_split, seq_len)
    tok = tl.arange(0, TILE)  # TILE tokens (several cache blocks) per iteration
    for t0 in range(first, last, TILE):
        pos = t0 + tok
        ok = pos < last
        bid, slot = tile_slots(BT, b, stride_btb, pos, ok, BS)
        k = load_tile(K, bid, slot, ok, kvh, d, d_ok, stride_kb, stride_ks, stride_kh)
        s = tl.where(ok[None, :], dot(q, tl.trans(k), IEEE), float("-inf"))  # [BLOCK_G, TILE]
        v = load_tile(V, bid, slot, ok, kvh, d, d_ok, stride_vb, stride_vs, stride_vh)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE)
    tl.store(ACC + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + d[None, :], acc,
             mask=g_ok[:, None] & d_ok[None, :])
    ml = ML + b * stride_mb + heads * stride_mh + split * stride_ms
    tl.store(ml, m_i, mask=g_ok)
    tl.store(ml + 1, l_i, mask=g_ok)


@triton.jit
def _merge_kernel(
    ACC, ML, O,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh, stride_ms,
    stride_ob, stride_oh,
    num_splits,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m_max = tl.full([1], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m_max = tl.maximum(m_max, tl.load(ML + b * stride_mb + h * stride_mh + s * stride_ms + tl.zeros([1], tl.int32)))
    total = tl.zeros([1], tl.float32)
    out = tl.zeros([BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        base = ML + b * stride_mb + h * stride_mh + s * stride_ms + tl.zeros([1], tl.int32)
        m = tl.load(base)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # an empty split weighs nothing
        total += w * tl.load(base + 1)
        acc = tl.load(ACC + b * stride_ab + h * stride_ah + s * stride_as + d, mask=d_ok, other=0.0)
        out += w * acc
    tl.store(O + b * stride_ob + h * stride_oh + d, (out / total).to(O.dtype.element_ty), mask=d_ok)


TILE_TOKENS = 64  # context tokens per inner iteration (several cache blocks)


def num_splits_for(batch: int, kv_heads: int, max_blocks: int, target_programs: int = 264) -> int:
    """Splits per sequence so that batch x kv_heads x splits fills about `target_programs`
    (two waves on an H100's 132 SMs), never more than the blocks a sequence can have."""
    return max(1, min(max_blocks, target_programs // max(1, batch * kv_heads)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    q [B, heads, D]; k_cache, v_cache [blocks, block_size, kv_heads, D] (one layer of the pool);
    block_tables [B, max_blocks] (int32 or int64); seq_lens [B] context lengths (>= 1, including
    the new token, whose K/V must already be written). Returns [B, heads, D] in q's dtype.
    """
    b, heads, d = q.shape
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    g = heads // kv_heads
    max_blocks = block_tables.shape[1]
    splits = num_splits or num_splits_for(b, kv_heads, max_blocks)
    tile = TILE_TOKENS
    acc = torch.empty(b, heads, splits, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(b, heads, splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_g = max(triton.next_power_of_2(g), 16)  # tl.dot needs 16 rows; the padding rows are zeros
    block_d = max(triton.next_power_of_2(d), 16)
    _decode_split_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, ml,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        ml.stride(0), ml.stride(1), ml.stride(2),
        scale, splits,
        G=g, BLOCK_G=block_g, D=d, BLOCK_D=block_d, BS=bs, TILE=tile,
        IEEE=k_cache.dtype == torch.float32,
    )
    _merge_kernel[(b, heads)](
        acc, ml, out,
        acc.stride(0), acc.stride(1), acc.stride(2),
        ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), out.stride(1),
        splits,
        D=d, BLOCK_D=block_d,
    )
    return out

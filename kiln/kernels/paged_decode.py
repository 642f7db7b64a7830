"""Paged-attention decode in Triton: one new query token per sequence, GQA-aware, split along the
sequence (flash-decoding).

Program (b, kv_head, split) reads its share of sequence b's context from the paged cache through
the block table, TILE_TOKENS tokens (several blocks) at a time, once for all G = heads / kv_heads
query heads that share the kv head: the scores and the weighted values are `tl.dot`s of the head
group (padded to 16 rows) against the tile, on tensor cores. It keeps an online softmax (running
max m, sum l, weighted values acc) in float32. With one split the program writes the output
itself; with several, each stores its partial (m, l, acc) and the last split of a (sequence, kv
head) to arrive, counted by an atomic, merges them: one launch per layer either way. Splits let a
batch-1 long-context decode use the whole GPU. Each sequence spreads its own context over the splits (computed on the device from its
length), so no split idles on block-table padding. No host synchronization and fixed grid shapes for
a given batch size, split count and table width, so the launch can be captured in a CUDA graph.

The torch reference (`paged_attention_ref` in kiln/model/attention.py) is the CPU path and the
oracle of the tests, which run this kernel on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.arrival import arrival_counters
from kiln.kernels.paged_tile import check_paged, dot, load_tile, online_softmax_step, tile_slots


@triton.jit
def _decode_split_kernel(
    Q, K, V, BT, SL, ACC, ML, O, CNT,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh, stride_ms,
    stride_ob, stride_oh,
    scale, v_scale, num_splits, min_split,
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
    gd_ok = g_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_ok, other=0.0)
    q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)  # [BLOCK_G, BLOCK_D]: padded rows are 0
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # Each sequence divides its own context among the splits (whole tiles each), so a split's
    # work follows the real length, not the block table's padded width: the grid can stay fixed
    # for a CUDA graph while lengths change from step to step. A short context uses fewer splits
    # (at least min_split tokens each; one split writes its output directly): the splits past
    # them do nothing, and the merge waits for the splits in use only.
    used = tl.minimum(tl.maximum(tl.cdiv(seq_len, min_split), 1), num_splits)
    per_split = tl.cdiv(tl.cdiv(seq_len, used), TILE) * TILE
    first = split * per_split
    last = tl.minimum(first + per_split, seq_len)
    tok = tl.arange(0, TILE)  # TILE tokens (several cache blocks) per iteration
    for t0 in range(first, last, TILE):
        pos = t0 + tok
        ok = pos < last
        bid, slot = tile_slots(BT, b, stride_btb, pos, ok, BS)
        k = load_tile(K, bid, slot, ok, kvh, d, d_ok, stride_kb, stride_ks, stride_kh).to(Q.dtype.element_ty)
        s = tl.where(ok[None, :], dot(q, tl.trans(k), IEEE), float("-inf"))  # [BLOCK_G, TILE]
        v = load_tile(V, bid, slot, ok, kvh, d, d_ok, stride_vb, stride_vs, stride_vh).to(Q.dtype.element_ty)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE)
    o_ptr = O + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    if used == 1:
        if split == 0:
            tl.store(o_ptr, (acc * (v_scale / tl.where(g_ok, l_i, 1.0))[:, None]).to(O.dtype.element_ty),
                     mask=gd_ok)
    elif split < used:
        a_ptr = ACC + b * stride_ab + heads[:, None] * stride_ah + d[None, :]
        m_ptr = ML + b * stride_mb + heads * stride_mh
        tl.store(a_ptr + split * stride_as, acc, mask=gd_ok)
        tl.store(m_ptr + split * stride_ms, m_i, mask=g_ok)
        tl.store(m_ptr + split * stride_ms + 1, l_i, mask=g_ok)
        # The last split of (b, kv head) to arrive merges them all (no second kernel): every
        # thread's partials are stored before the barrier, the counter's release publishes them,
        # its acquire on the last arrival sees them; that program resets the counter for the next
        # launch. Partials are read through L2 (.cg), never a stale L1 line.
        tl.debug_barrier()
        cnt = CNT + b * tl.num_programs(1) + kvh
        if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == used - 1:
            m_tot = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_tot = tl.zeros([BLOCK_G], tl.float32)
            out = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            for sp in range(0, used):
                m_s = tl.load(m_ptr + sp * stride_ms, mask=g_ok, other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(m_ptr + sp * stride_ms + 1, mask=g_ok, other=0.0, cache_modifier=".cg")
                a_s = tl.load(a_ptr + sp * stride_as, mask=gd_ok, other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_tot, m_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an empty split weighs nothing
                alpha = tl.exp(m_tot - m_safe)
                beta = tl.exp(m_s - m_safe)
                l_tot = l_tot * alpha + l_s * beta
                out = out * alpha[:, None] + a_s * beta[:, None]
                m_tot = m_new
            tl.store(o_ptr, (out * (v_scale / tl.where(g_ok, l_tot, 1.0))[:, None]).to(O.dtype.element_ty),
                     mask=gd_ok)
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """One counter per (sequence, kv head), for the split merge (kiln.kernels.arrival)."""
    return arrival_counters("paged_decode", device, n, 1 << 16)


TILE_TOKENS = 64  # context tokens per inner iteration (several cache blocks)


def num_splits_for(batch: int, kv_heads: int, max_blocks: int, target_programs: int = 264) -> int:
    """Splits per sequence so that batch x kv_heads x splits fills about `target_programs`
    (two waves on an H100's 132 SMs), never more than the blocks a sequence can have."""
    return max(1, min(max_blocks, target_programs // max(1, batch * kv_heads)))


# A split takes at least this much context, so a short context uses fewer splits (and merges fewer
# partials). Measured on an H100 (benchmarks/gpu_decode_attention.py, llama-2-7b, batch 1, 192
# tokens): 6.3 us per layer with 64, 8.0 with 256, 8.5 with 8 splits of which 5 were empty.
MIN_SPLIT_TOKENS = 64


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, min_split_tokens: int = MIN_SPLIT_TOKENS,
                           config: tuple[int, int, int] | None = None,
                           kv_scales: tuple[float, float] | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    q [B, heads, D]; k_cache, v_cache [blocks, block_size, kv_heads, D] (one layer of the pool);
    block_tables [B, max_blocks] (int32 or int64); seq_lens [B] context lengths (>= 1, including
    the new token, whose K/V must already be written). Returns [B, heads, D] in q's dtype.
    num_splits: the most splits per sequence (a sequence uses one per min_split_tokens of its
    context); config: (TILE tokens, warps, stages), for sweeps. An fp8 cache (kiln.quant.kv_cache)
    needs `kv_scales` (k, v): the codes are converted to q's dtype, k's scale folds into the score
    scale and v's into the output normalization.
    """
    b, heads, d = q.shape
    bs, kv_heads = check_paged(q, k_cache, v_cache, kv_scales)
    ks, vs = kv_scales or (1.0, 1.0)
    g = heads // kv_heads
    max_blocks = block_tables.shape[1]
    splits = num_splits or num_splits_for(b, kv_heads, max_blocks)
    # (the same sweep: 8 warps where a few programs split a context, 4 where the batch fills the GPU;
    # an fp8 cache with the batch filling the GPU: 2 warps, 124 against 149 us at batch 256 x 128)
    fp8 = kv_scales is not None
    tile, warps, stages = config or (TILE_TOKENS, 8 if splits > 1 else (2 if fp8 else 4), 2)
    acc = torch.empty(b, heads, splits, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(b, heads, splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_g = max(triton.next_power_of_2(g), 16)  # tl.dot needs 16 rows; the padding rows are zeros
    block_d = max(triton.next_power_of_2(d), 16)
    _decode_split_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, ml, out, _arrival_counters(q.device, b * kv_heads),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), out.stride(1),
        scale * ks, vs, splits, max(1, min_split_tokens),
        G=g, BLOCK_G=block_g, D=d, BLOCK_D=block_d, BS=bs, TILE=tile,
        IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return out

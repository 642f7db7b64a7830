"""Prefill/extend attention over the paged KV cache in Triton (flash-attention style, varlen).

One step's queries are flat [T, heads, D]: each sequence contributes q_len consecutive tokens (a
whole new prompt, a chunk of one, the tail after a prefix-cache hit, or a single decode token),
the last q_len positions of its context of seq_len tokens, whose keys and values (the new ones
included) are already in the cache. Program (tile, head) takes BLOCK_M queries of one sequence,
listed by the host in `tile_seq`/`tile_start`, so no program is spent on padding however uneven the
batch; it walks that sequence's keys through its block table BLOCK_N at a time up to its last
query's position (causal), with an online softmax in float32 and `tl.dot`s on tensor cores. A
sliding window (Mistral) skips the keys before the tile's window and masks per query.

The torch reference (`paged_attention_ref` in kiln/model/attention.py) is the CPU path; the tests
run this kernel through Triton's interpreter against an independent float64 computation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.paged_tile import check_paged, dot, load_tile, online_softmax_step, tile_slots
from kiln.kernels.prefill_tiles import BLOCK_M


@triton.jit
def _prefill_kernel(
    Q, K, V, O, BT, SL, QS, TILE_SEQ, TILE_START,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_btb,
    scale, v_scale, window,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(TILE_SEQ + tile)
    m0 = tl.load(TILE_START + tile)
    q_start = tl.load(QS + b)
    q_len = tl.load(QS + b + 1) - q_start
    seq_len = tl.load(SL + b).to(tl.int32)
    ctx0 = seq_len - q_len  # position of the sequence's first query
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    qpos = ctx0 + offs_m
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    kvh = h // G
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(seq_len, ctx0 + m0 + BLOCK_M)  # past the tile's last query: all masked
    hi = tl.where(m0 < q_len, hi, 0)  # a padding tile (prefill graphs): no queries, no work
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx0 + m0 - window + 1, 0)
    tok = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tok
        ok = pos < hi
        bid, slot = tile_slots(BT, b, stride_btb, pos, ok, BS)
        k = load_tile(K, bid, slot, ok, kvh, d, d_ok, stride_kb, stride_ks, stride_kh).to(Q.dtype.element_ty)
        s = dot(q, tl.trans(k), IEEE) * scale
        allowed = ok[None, :] & (pos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (qpos[:, None] - pos[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        v = load_tile(V, bid, slot, ok, kvh, d, d_ok, stride_vb, stride_vs, stride_vh).to(Q.dtype.element_ty)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past q_len (never stored)
    out = acc * (v_scale / l_i)[:, None]
    tl.store(O + rows[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                            tile_seq: torch.Tensor, tile_start: torch.Tensor, scale: float,
                            sliding_window: int | None = None,
                            kv_scales: tuple[float, float] | None = None) -> torch.Tensor:
    """Causal attention of flat queries q [T, heads, D] over their sequences' paged contexts.

    Sequence b owns query rows query_start[b]:query_start[b+1], the last positions of its context
    of seq_lens[b] tokens, all of whose K/V are in k_cache/v_cache [blocks, block_size, kv_heads, D]
    at block_tables[b]. tile_seq/tile_start: `prefill_tiles` of the sequences' query counts.
    Returns [T, heads, D] in q's dtype. An fp8 cache needs `kv_scales` (as paged_decode_attention).
    """
    t, heads, d = q.shape
    bs, kv_heads = check_paged(q, k_cache, v_cache, kv_scales)
    ks, vs = kv_scales or (1.0, 1.0)
    out = torch.empty(t, heads, d, dtype=q.dtype, device=q.device)
    n_tiles = tile_seq.shape[0]
    if n_tiles == 0:
        return out
    block_d = max(triton.next_power_of_2(d), 16)
    fp32 = q.dtype == torch.float32
    _prefill_kernel[(n_tiles, heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start, tile_seq, tile_start,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        scale * ks, vs, sliding_window or 0,
        G=heads // kv_heads, D=d, BLOCK_D=block_d, BS=bs, BLOCK_M=BLOCK_M,
        BLOCK_N=32 if fp32 else 64, HAS_WINDOW=sliding_window is not None, IEEE=fp32,
        num_warps=4, num_stages=1 if fp32 else 2,
    )
    return out

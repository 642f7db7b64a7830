"""Pieces both paged-attention kernels share: the `@triton.jit` helpers they inline (reading a tile
of K or V through a block table, a dot on tensor cores (IEEE float32 when the cache is float32),
one step of the online softmax) and the host-side check of their inputs (`check_paged`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def check_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                kv_scales: tuple[float, float] | None = None) -> tuple[int, int]:
    """Refuse inputs the kernels cannot read; returns (block_size, kv_heads) of the cache
    [blocks, block_size, kv_heads, D], in q's dtype or float8_e4m3fn with `kv_scales`."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if v_cache.dtype != k_cache.dtype or (not fp8 and k_cache.dtype != q.dtype) or fp8 != (kv_scales is not None):
        raise ValueError("the KV cache must be in q's dtype, or float8_e4m3fn with kv_scales")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    return k_cache.shape[1], kv_heads


@triton.jit
def tile_slots(BT, b, stride_btb, pos, ok, BS: tl.constexpr):
    """(cache block, offset in it) of positions `pos` (masked by `ok`) of sequence b."""
    return tl.load(BT + b * stride_btb + pos // BS, mask=ok, other=0).to(tl.int64), pos % BS


@triton.jit
def load_tile(Cache, bid, slot, ok, kvh, d, d_ok, stride_b, stride_s, stride_h):
    """Keys or values of kv head `kvh` at those slots: [len(slot), D], 0 where not `ok`."""
    return tl.load(Cache + bid[:, None] * stride_b + slot[:, None] * stride_s + kvh * stride_h + d[None, :],
                   mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold scores s [M, N] (-inf where not allowed) and values v [N, D] into the running max m_i,
    sum l_i and weighted values acc (all float32); returns the new (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc

"""Rotary embedding of q and k fused with writing the new k and v into the paged KV cache.

One program per token: it rotates all of the token's query heads (written to a new [T, heads, D]
tensor) and key heads (written straight to the token's cache slot, with its value heads beside
them), in the rotate-half convention, from the token's float32 cos|sin row. The reference is
`apply_rope` then `write_kv` (kiln.model.layers / kiln.model.attention); the kernel rotates in
float32 and rounds once, where the reference rounds after each product, so they agree to within
one rounding of the model dtype.

With an fp8 cache (kiln.quant.kv_cache) the kernel stores E4M3 codes of k / k_scale and
v / v_scale, saturated to +-448; the rotated keys it returns (`with_k`) stay unquantized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.codes import round_to_e4m3
from kiln.quant.fp8 import FP8_DTYPE


@triton.jit
def _to_cache(x, scale, FP8: tl.constexpr, dtype: tl.constexpr):
    """float32 values -> what the cache stores: the model dtype, or E4M3 codes of x / scale."""
    if FP8:
        x = round_to_e4m3(tl.minimum(tl.maximum(x / scale, -448.0), 448.0))
    return x.to(dtype)


@triton.jit
def _rope_cache_kernel(
    Q, K, V, CS, SLOT, QO, KC, VC,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kvh, stride_vb, stride_vs, stride_vvh, k_scale, v_scale,
    FP8: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BS: tl.constexpr, K_OUT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    cos = tl.load(CS + t * stride_cs + i, mask=i_ok, other=0.0)[None, :]
    sin = tl.load(CS + t * stride_cs + HALF + i, mask=i_ok, other=0.0)[None, :]

    h = tl.arange(0, BLOCK_H)
    m = (h < H)[:, None] & i_ok[None, :]
    src = Q + t * stride_qt + h[:, None] * stride_qh + i[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    dst = QO + t * stride_ot + h[:, None] * stride_oh + i[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(QO.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(QO.dtype.element_ty), mask=m)

    slot = tl.load(SLOT + t).to(tl.int64)
    blk = slot // BS
    off = slot % BS
    kh = tl.arange(0, BLOCK_KVH)
    m = (kh < KVH)[:, None] & i_ok[None, :]
    src = K + t * stride_kt + kh[:, None] * stride_kh + i[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    k1 = (x1 * cos - x2 * sin).to(QO.dtype.element_ty)
    k2 = (x2 * cos + x1 * sin).to(QO.dtype.element_ty)
    dst = KC + blk * stride_kb + off * stride_ks + kh[:, None] * stride_kvh + i[None, :]
    tl.store(dst, _to_cache(k1.to(tl.float32), k_scale, FP8, KC.dtype.element_ty), mask=m)
    tl.store(dst + HALF, _to_cache(k2.to(tl.float32), k_scale, FP8, KC.dtype.element_ty), mask=m)
    if K_OUT:  # the rotated keys also go to rows H.. of the output (attention over them directly)
        dst = QO + t * stride_ot + (H + kh[:, None]) * stride_oh + i[None, :]
        tl.store(dst, k1, mask=m)
        tl.store(dst + HALF, k2, mask=m)
    src = V + t * stride_vt + kh[:, None] * stride_vh + i[None, :]
    dst = VC + blk * stride_vb + off * stride_vs + kh[:, None] * stride_vvh + i[None, :]
    v1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    v2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(dst, _to_cache(v1, v_scale, FP8, VC.dtype.element_ty), mask=m)
    tl.store(dst + HALF, _to_cache(v2, v_scale, FP8, VC.dtype.element_ty), mask=m)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   with_k: bool = False, kv_scales: tuple[float, float] | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k and v [T, KVH, D] (any strides with a contiguous last dim, e.g. views of the
    fused qkv output); cos_sin [T, D] float32 (cos | sin); caches [blocks, block_size, KVH, D];
    slot_mapping [T]. Writes rotated k and v at their slots (E4M3 codes of k / k_scale and v / v_scale
    for float8_e4m3fn caches, which need `kv_scales`); returns rotated q [T, H, D], and with
    `with_k` also the rotated k [T, KVH, D] (both views of one [T, H + KVH, D] tensor)."""
    fp8 = k_cache.dtype == FP8_DTYPE
    if fp8 != (kv_scales is not None) or v_cache.dtype != k_cache.dtype:
        raise ValueError("an fp8 KV cache needs kv_scales, and only an fp8 cache takes them")
    ks, vs = kv_scales or (1.0, 1.0)
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if d % 2 or min(q.stride(-1), k.stride(-1), v.stride(-1), cos_sin.stride(-1)) != 1:
        raise ValueError("rope_and_cache needs an even head dim, contiguous in every input")
    full = torch.empty(t, heads + (kv_heads if with_k else 0), d, dtype=q.dtype, device=q.device)
    out = full[:, :heads]
    result = (out, full[:, heads:]) if with_k else out
    if t == 0:
        return result
    half = d // 2
    _rope_cache_kernel[(t,)](
        q, k, v, cos_sin, slot_mapping, out, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), ks, vs,
        FP8=fp8, H=heads, KVH=kv_heads, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_KVH=triton.next_power_of_2(kv_heads), HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), BS=k_cache.shape[1], K_OUT=with_k, num_warps=4,
    )
    return result

"""RMSNorm, optionally fused with the residual add that precedes it, in one pass over each row.

With a residual: s = x + residual (rounded to the model dtype, as the reference's add is), stored as
the new residual stream, then y = weight * (s * rsqrt(mean(s^2) + eps)) normalized in float32 and
scaled in the model dtype: the reference's numbers (kiln.model.layers.rms_norm_ref) and its
roundings, for one read of each input and one write of each output instead of eight kernels.

`embed_rows` is the embedding lookup of the small-batch path (kiln.kernels.gemv), which also
writes each row's sum of squares for the first layer's fused norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * inv).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (y * w).to(Y.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual [rows, N] (last dim contiguous) -> (normed, x + residual or None)."""
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs rows with a contiguous last dimension")
    rows, n = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(y) if residual is not None else None
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, y, s if s is not None else y,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        s.stride(0) if s is not None else 0, n, eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
    )
    return y, s


@triton.jit
def _embed_rows_kernel(E, IDS, Y, SS, stride_e, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tok = tl.load(IDS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(E + tok * stride_e + cols, mask=ok, other=0.0)
    tl.store(Y + row * stride_y + cols, x, mask=ok)
    xf = x.to(tl.float32)
    tl.store(SS + row, tl.sum(xf * xf, axis=0))


def embed_rows(table: torch.Tensor, ids: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
    """table[ids] as a new [T, N] tensor, with each row's sum of squares (float32) written into
    ss [T]: the embedding lookup that starts the small-batch path (kiln.kernels.gemv's NORM input)."""
    t, n = ids.shape[0], table.shape[1]
    y = torch.empty(t, n, dtype=table.dtype, device=table.device)
    block = triton.next_power_of_2(n)
    _embed_rows_kernel[(t,)](table, ids, y, ss, table.stride(0), y.stride(0), n, BLOCK=block,
                             num_warps=min(max(block // 256, 1), 8))
    return y

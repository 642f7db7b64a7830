"""Symmetric int8 quantization and the reference int8 linear layers (CPU path and test oracle).

Weights: per output channel, w[n, :] ≈ q[n, :] * scale[n] with q in [-127, 127] (the -128 code is
never used, so negating a row never overflows). Activations (SmoothQuant W8A8): per token, dynamic,
the same scheme along the row. A row of zeros gets scale 1 and codes 0, never a division by zero.

The reference linears scale after the integer (or exact float64) dot product, as a GEMM with the
dequantization fused into its epilogue does, and never build the full-precision weight.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] (any float dtype) -> (codes int8 [R, K], scales float32 [R]), symmetric per row."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(xf / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def int8_weight_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8: y = (x @ q^T) * scale (+ bias), accumulated in float32, in x's dtype."""
    y = (x.float() @ q.float().T) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: each row of x is quantized per token, the int8 x int8 dot products are exact (int32 in a
    GPU kernel; float64 holds them exactly here), then scaled by both scales; in x's dtype."""
    xq, xs = quantize_rows(x)
    acc = xq.double() @ q.double().T  # |acc| <= K * 127^2: exact in float64 for any real K
    y = acc.float() * xs[:, None] * scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

"""FP8 (E4M3) quantization and the reference fp8 linear layer (CPU path and test oracle).

Weights: per output channel, w[n, :] ≈ q[n, :] * scale[n], scale = absmax / 448 (E4M3's largest
finite value), codes rounded to nearest by the float8_e4m3fn cast. Activations: per token, dynamic
(the same scheme along each row), or static: one calibrated per-tensor scale, the codes clamped to
±448 (a value above the calibrated range saturates instead of becoming NaN).

The reference multiplies the codes exactly (an E4M3 x E4M3 product fits in float32), accumulates
in float32 and scales after the dot product, as a GEMM with a fused epilogue does.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as E4M3 codes, saturated to ±448; scale broadcasts against x."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (codes float8_e4m3fn [R, K], scales float32 [R]); a zero row gets scale 1."""
    amax = x.float().abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return fp8_codes(x, scale[..., None]), scale


def fp8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                   act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = (fp8(x) @ q^T) * x_scale * scale (+ bias) in x's dtype; activations per token (dynamic)
    or with the static per-tensor `act_scale` [1]."""
    if act_scale is None:
        xq, xs = quantize_rows_fp8(x)
        xs = xs[:, None]
    else:
        xq, xs = fp8_codes(x, act_scale), act_scale.float()
    y = (xq.float() @ q.float().T) * xs * scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

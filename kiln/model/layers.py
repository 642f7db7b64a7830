"""Building blocks of the Llama family: RMSNorm, rotary embeddings, the gated MLP.

Each fused op has its torch reference here (`*_ref`): the CPU path and the test oracle. On CUDA the
Triton kernels of kiln.kernels run instead (see `kiln.kernels.use_kernels`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels import use_kernels
from kiln.quant.linear import make_linear
from kiln.quant.recipe import QuantScheme


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalizes in float32 and scales in the input dtype, as the reference implementation does."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    """`norm(x)`, or `norm(x, residual)` -> (norm(x + residual), x + residual): the residual add
    fused into the norm that follows it (one kernel on CUDA)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_kernels(x) and x.dim() == 2:
            from kiln.kernels.norm import rms_norm

            y, s = rms_norm(x, self.weight, self.eps, residual)
            return y if residual is None else (y, s)
        if residual is None:
            return rms_norm_ref(x, self.weight, self.eps)
        s = x + residual
        return rms_norm_ref(s, self.weight, self.eps), s


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies, with `llama3` or `linear` scaling applied when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, max_positions: int, device: torch.device) -> torch.Tensor:
    """A [max_positions, head_dim] float32 table: cos in the first half, sin in the second."""
    inv_freq = rope_inv_freq(cfg).to(device)
    pos = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by per-token [T, head_dim] cos|sin (rotate-half convention)."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half].to(x.dtype), cos_sin[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one fused projection."""

    def __init__(self, cfg: ModelConfig, quant: QuantScheme | None = None):
        super().__init__()
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, quant)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, quant,
                                     rotated_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] gate|up -> silu(gate) * up [T, I]."""
    if use_kernels(gate_up):
        from kiln.kernels.activation import silu_mul as kernel

        return kernel(gate_up)
    return silu_mul_ref(gate_up)

"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

For a linear layer with per-input-channel activation maxima a[j] (calibration) and weight column
maxima w[j], the smoothing factor is s[j] = a[j]^alpha / w[j]^(1 - alpha). The layer computes
(x / s) @ (W * s)^T, the same product, with activations that are easier to quantize per token and
weights that are still quantized per output channel. x / s costs nothing at run time: 1/s is folded
into whatever produces x, and each fold is exact in real arithmetic:

- qkv_proj: its input is input_norm's output, so input_norm.weight /= s;
- gate_up_proj: post_attn_norm.weight /= s;
- o_proj: its input channel (head h, dim d) is a weighted sum of v channel (kv head of h, d), so
  those v rows of qkv_proj (and bias) /= s; the query heads sharing a kv head (GQA) share one
  factor, taken over the group's maxima;
- down_proj: its input is silu(gate) * up, so the up rows of gate_up_proj (and bias) /= s.

Dividing a whole output row of qkv_proj or gate_up_proj by a factor does not change that row's
per-channel int8 codes, only its scale: the folds into v and up add no quantization error.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig

MIN_FACTOR = 1e-5

FOLDS = {  # quantized linear -> where its 1/s is folded (recorded in the manifest)
    "attn.qkv_proj": "input_norm.weight",
    "attn.o_proj": "the v rows of attn.qkv_proj (weight and bias)",
    "mlp.gate_up_proj": "post_attn_norm.weight",
    "mlp.down_proj": "the up rows of mlp.gate_up_proj (weight and bias)",
}


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] for one linear (weight [out, in]); 1 where a channel saw no activation or has no weight."""
    a = act_absmax.float().to(weight.device)
    w = weight.float().abs().amax(dim=0)
    s = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=MIN_FACTOR), torch.ones_like(s))


def smooth_layer(t: dict[str, torch.Tensor], cfg: ModelConfig, layer: int, stats: dict[str, torch.Tensor],
                 alpha: float) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant to one decoder layer's float tensors `t` (runtime names); returns the
    changed tensors in float32 (the caller casts them back)."""
    p = f"layers.{layer}."
    f = {k: v.float().clone() for k, v in t.items() if k.startswith(p)}
    bias = cfg.qkv_bias
    # qkv_proj <- input_norm
    s = smoothing_factors(stats[p + "attn.qkv_proj"], f[p + "attn.qkv_proj.weight"], alpha)
    f[p + "attn.qkv_proj.weight"] *= s[None, :]
    f[p + "input_norm.weight"] /= s
    # o_proj <- v rows of qkv_proj, one factor per (kv head, dim) shared by the heads of its group
    kvh, hd, group = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    wo = f[p + "attn.o_proj.weight"]
    a = stats[p + "attn.o_proj"].float().to(wo.device).view(kvh, group, hd).amax(dim=1)
    w = wo.abs().amax(dim=0).view(kvh, group, hd).amax(dim=1)
    s_kv = smoothing_factors(a.reshape(-1), w.reshape(1, -1), alpha)  # [kvh * hd]
    wo *= s_kv.view(kvh, 1, hd).expand(kvh, group, hd).reshape(1, -1)
    v0 = cfg.q_size + cfg.kv_size
    f[p + "attn.qkv_proj.weight"][v0:v0 + cfg.kv_size] /= s_kv[:, None]
    if bias:
        f[p + "attn.qkv_proj.bias"][v0:v0 + cfg.kv_size] /= s_kv
    # gate_up_proj <- post_attn_norm
    s = smoothing_factors(stats[p + "mlp.gate_up_proj"], f[p + "mlp.gate_up_proj.weight"], alpha)
    f[p + "mlp.gate_up_proj.weight"] *= s[None, :]
    f[p + "post_attn_norm.weight"] /= s
    # down_proj <- up rows of gate_up_proj
    i = cfg.intermediate_size
    s = smoothing_factors(stats[p + "mlp.down_proj"], f[p + "mlp.down_proj.weight"], alpha)
    f[p + "mlp.down_proj.weight"] *= s[None, :]
    f[p + "mlp.gate_up_proj.weight"][i:] /= s[:, None]
    if cfg.mlp_bias:
        f[p + "mlp.gate_up_proj.bias"][i:] /= s
    return f

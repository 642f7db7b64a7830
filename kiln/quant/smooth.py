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

alpha is one number for every layer, or "auto": for each linear layer, the alpha of ALPHA_GRID
whose W8A8 product on a sample of that layer's calibration inputs is closest (squared error) to
the float product (`search_alphas`). The folds are independent between linear layers, so each
layer's choice is its own.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig
from kiln.quant.int8 import quantize_rows
from kiln.quant.recipe import QUANT_LINEARS
from kiln.quant.rotate import block_rotate

MIN_FACTOR = 1e-5
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

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


def linear_factors(cfg: ModelConfig, kind: str, act_absmax: torch.Tensor, weight: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """The factors of one linear (`kind` in QUANT_LINEARS) over its input channels; for o_proj one
    factor per (kv head, dim), repeated over the query heads of its group."""
    if kind != "attn.o_proj":
        return smoothing_factors(act_absmax, weight, alpha)
    kvh, hd, group = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    a = act_absmax.float().to(weight.device).view(kvh, group, hd).amax(dim=1)
    w = weight.float().abs().amax(dim=0).view(kvh, group, hd).amax(dim=1)
    s_kv = smoothing_factors(a.reshape(-1), w.reshape(1, -1), alpha)
    return s_kv.view(kvh, 1, hd).expand(kvh, group, hd).reshape(-1)


def smooth_layer(t: dict[str, torch.Tensor], cfg: ModelConfig, layer: int, stats: dict[str, torch.Tensor],
                 alpha: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant to one decoder layer's float tensors `t` (runtime names); returns the
    layer's tensors in float32 (the caller casts them back). `alpha`: one value, or one per
    linear name (`layers.{i}.attn.qkv_proj`, ...)."""
    p = f"layers.{layer}."
    f = {k: v.float().clone() for k, v in t.items() if k.startswith(p)}

    def factors(kind):
        a = alpha if isinstance(alpha, (int, float)) else alpha[p + kind]
        s = linear_factors(cfg, kind, stats[p + kind], f[p + kind + ".weight"], a)
        f[p + kind + ".weight"] *= s[None, :]
        return s

    qkv = f[p + "attn.qkv_proj.weight"]
    f[p + "input_norm.weight"] /= factors("attn.qkv_proj")
    s = factors("attn.o_proj")  # the v rows of qkv_proj take one factor per (kv head, dim)
    kvh, hd, group = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    s_kv = s.view(kvh, group, hd)[:, 0, :].reshape(-1)
    v0 = cfg.q_size + cfg.kv_size
    qkv[v0:v0 + cfg.kv_size] /= s_kv[:, None]
    if cfg.qkv_bias:
        f[p + "attn.qkv_proj.bias"][v0:v0 + cfg.kv_size] /= s_kv
    f[p + "post_attn_norm.weight"] /= factors("mlp.gate_up_proj")
    s = factors("mlp.down_proj")
    i = cfg.intermediate_size
    f[p + "mlp.gate_up_proj.weight"][i:] /= s[:, None]
    if cfg.mlp_bias:
        f[p + "mlp.gate_up_proj.bias"][i:] /= s
    return f


ROTATED = ("attn.o_proj", "mlp.down_proj")  # the inputs kiln.quant.rotate turns


def _w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, ref: torch.Tensor, rotate: int = 0) -> float:
    xs_, ws_ = x / s[None, :], w * s[None, :]
    if rotate:
        xs_, ws_ = block_rotate(xs_, rotate), block_rotate(ws_, rotate)
    xq, xs = quantize_rows(xs_)
    wq, ws = quantize_rows(ws_)
    y = (xq.float() @ wq.float().T) * xs[:, None] * ws[None, :]
    return float((y - ref).pow(2).sum())


@torch.no_grad()
def search_alphas(tensors: dict[str, torch.Tensor], cfg: ModelConfig, stats: dict[str, torch.Tensor],
                  samples: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                  rotate: int = 0) -> dict[str, float]:
    """{linear name: the alpha of ALPHA_GRID with the least W8A8 error on its calibration sample}.
    For o_proj and down_proj the sample is taken before any smoothing of the layers that feed them,
    which is what the folds preserve (they divide those inputs by exactly s); with `rotate` their
    smoothed inputs and weights are rotated as the engine will rotate them."""
    out = {}
    for i in range(cfg.num_layers):
        for kind in QUANT_LINEARS:
            name = f"layers.{i}.{kind}"
            w = tensors[name + ".weight"].to(device).float()
            x = samples[name].to(device).float()
            ref = x @ w.T
            rot = rotate if kind in ROTATED else 0
            errs = [_w8a8_error(x, w, linear_factors(cfg, kind, stats[name], w, a), ref, rot) for a in ALPHA_GRID]
            out[name] = ALPHA_GRID[min(range(len(errs)), key=errs.__getitem__)]
    return out

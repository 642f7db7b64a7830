"""How Hugging Face checkpoint tensors map onto kiln's runtime weight layout.

The runtime keeps fused projections: `qkv_proj` is q, k and v stacked along the output dimension,
`gate_up_proj` is gate then up. The build applies this layout once; loading assigns the stored
tensors as they are. A quantized engine stores each quantized linear's codes and scales instead of
its weight (kiln.quant.recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.quant.recipe import QUANT_LINEARS, QuantScheme


@dataclass(frozen=True)
class WeightSpec:
    """One runtime tensor: its name, shape, and the checkpoint tensors concatenated (dim 0) into it;
    `dtype` names its stored dtype when that is not the engine dtype (quantized codes, scales)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    dtype: str | None = None


def runtime_layout(cfg: ModelConfig, quant: QuantScheme | None = None) -> list[WeightSpec]:
    """Every tensor an engine of this config (and quantization scheme) stores, in a fixed order."""
    specs = _float_layout(cfg)
    return specs if quant is None else quantized_layout(specs, quant)


def quantized_layout(specs: list[WeightSpec], quant: QuantScheme) -> list[WeightSpec]:
    """The float layout with each quantized linear's weight replaced by its codes and scales."""
    out = []
    for spec in specs:
        prefix, _, leaf = spec.name.rpartition(".")
        if leaf != "weight" or not prefix.endswith(QUANT_LINEARS):
            out.append(spec)
            continue
        out.append(WeightSpec(f"{prefix}.qweight", spec.shape, spec.sources, quant.weight_dtype))
        out.append(WeightSpec(f"{prefix}.wscale", spec.shape[:1], (), "float32"))
        if quant.static_act_scale:
            out.append(WeightSpec(f"{prefix}.act_scale", (1,), (), "float32"))
    return out


def _float_layout(cfg: ModelConfig) -> list[WeightSpec]:
    h, hd = cfg.hidden_size, cfg.head_dim
    specs = [WeightSpec("embed_tokens.weight", (cfg.vocab_size, h), ("model.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        src = f"model.layers.{i}"
        dst = f"layers.{i}"

        def add(name: str, shape: tuple[int, ...], *sources: str) -> None:
            specs.append(WeightSpec(f"{dst}.{name}", shape, tuple(f"{src}.{s}" for s in sources)))

        add("input_norm.weight", (h,), "input_layernorm.weight")
        qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        add("attn.qkv_proj.weight", (cfg.qkv_size, h), *(f"{p}.weight" for p in qkv))
        if cfg.qkv_bias:
            add("attn.qkv_proj.bias", (cfg.qkv_size,), *(f"{p}.bias" for p in qkv))
        add("attn.o_proj.weight", (h, cfg.q_size), "self_attn.o_proj.weight")
        if cfg.o_bias:
            add("attn.o_proj.bias", (h,), "self_attn.o_proj.bias")
        if cfg.qk_norm:
            add("attn.q_norm.weight", (hd,), "self_attn.q_norm.weight")
            add("attn.k_norm.weight", (hd,), "self_attn.k_norm.weight")
        add("post_attn_norm.weight", (h,), "post_attention_layernorm.weight")
        i_size = cfg.intermediate_size
        add("mlp.gate_up_proj.weight", (2 * i_size, h), "mlp.gate_proj.weight", "mlp.up_proj.weight")
        if cfg.mlp_bias:
            add("mlp.gate_up_proj.bias", (2 * i_size,), "mlp.gate_proj.bias", "mlp.up_proj.bias")
        add("mlp.down_proj.weight", (h, i_size), "mlp.down_proj.weight")
        if cfg.mlp_bias:
            add("mlp.down_proj.bias", (h,), "mlp.down_proj.bias")
    specs.append(WeightSpec("norm.weight", (h,), ("model.norm.weight",)))
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", (cfg.vocab_size, h), ("lm_head.weight",)))
    return specs

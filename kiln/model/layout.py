"""How Hugging Face checkpoint tensors map onto kiln's runtime weight layout.

The runtime keeps fused projections: `qkv_proj` is q, k and v stacked along the output dimension,
`gate_up_proj` is gate then up. The build applies this layout once; loading assigns the stored
tensors as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig


@dataclass(frozen=True)
class WeightSpec:
    """One runtime tensor: its name, shape, and the checkpoint tensors concatenated (dim 0) into it."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]


def runtime_layout(cfg: ModelConfig) -> list[WeightSpec]:
    """Every tensor an engine of this config stores, in a fixed order."""
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

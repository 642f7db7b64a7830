"""One model definition for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

Tokens of every sequence in a step are flattened into one [T] batch; attention finds its per-sequence
structure in the ambient AttentionMetadata. Parameter names are exactly kiln.model.layout's names, so a
built engine's tensors are assigned as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.model.attention import current_metadata, paged_attention, rope_and_cache
from kiln.model.layers import GatedMLP, RMSNorm


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = self.q_norm(q.reshape(-1, cfg.head_dim)).view(t, cfg.num_heads, cfg.head_dim)
            k = self.k_norm(k.reshape(-1, cfg.head_dim)).view(t, cfg.num_kv_heads, cfg.head_dim)
        meta = current_metadata()
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        q = rope_and_cache(q, k, v, cos_sin, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, cfg.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos_sin: torch.Tensor,
                kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream travels beside the layer outputs: each layer's first norm adds the
        previous layer's output to it (one fused kernel on CUDA). Returns (mlp output, residual)."""
        if residual is None:
            residual, h = h, self.input_norm(h)
        else:
            h, residual = self.input_norm(h, residual)
        h = self.attn(h, cos_sin, kv_cache)
        h, residual = self.post_attn_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Pass the (meta) weight in: a random init would be wasted work, and normal_ on the meta
        # device imports torch._dynamo (about a second of load time).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rope_table: torch.Tensor,
                kv_caches: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: [layers, 2, blocks, block_size, kv_heads, hd].

        Returns the final hidden states [T, hidden], after the last norm.
        """
        h, residual = self.embed_tokens(input_ids), None
        cos_sin = rope_table.index_select(0, positions)
        for layer, kv in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos_sin, kv)
        return self.norm(h, residual)[0]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for the selected final hidden states [N, hidden]."""
        weight = self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(h, weight).float()

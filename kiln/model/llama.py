"""One model definition for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

Tokens of every sequence in a step are flattened into one [T] batch; attention finds its per-sequence
structure in the ambient AttentionMetadata. Parameter names are exactly kiln.model.layout's names, so a
built engine's tensors are assigned as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels import use_kernels
from kiln.model.attention import current_metadata, fresh_attention, paged_attention, rope_and_cache
from kiln.model.layers import GatedMLP, RMSNorm
from kiln.quant.linear import linear_input, make_linear, small_linear_args
from kiln.quant.recipe import QuantScheme

SMALL_BATCH_ROWS = 16  # steps of at most this many tokens take the fused small-batch path on a GPU
# (kiln.kernels.gemv.MAX_ROWS; measured faster than cuBLAS + separate norm/activation kernels)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantScheme | None = None):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = make_linear(cfg.hidden_size, cfg.qkv_size, cfg.qkv_bias, quant)
        self.o_proj = make_linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, quant)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.head_dim ** -0.5
        self.kv_scales = None  # (k, v) scales of an fp8 KV cache (kiln.quant.kv_cache), set at load

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), cos_sin, kv_cache))

    def attend(self, qkv: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """[T, qkv_size] projections -> [T, q_size] attention output (before o_proj); stores the
        new keys and values in the cache."""
        cfg = self.cfg
        t = qkv.shape[0]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = self.q_norm(q.reshape(-1, cfg.head_dim)).view(t, cfg.num_heads, cfg.head_dim)
            k = self.k_norm(k.reshape(-1, cfg.head_dim)).view(t, cfg.num_kv_heads, cfg.head_dim)
        meta = current_metadata()
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if meta.fresh and meta.sliding_window is None and use_kernels(q):
            return fresh_attention(q, k, v, cos_sin, k_cache, v_cache, meta, self.scale,
                                   self.kv_scales).reshape(t, cfg.q_size)
        q = rope_and_cache(q, k, v, cos_sin, k_cache, v_cache, meta.slot_mapping, self.kv_scales)
        return paged_attention(q, k_cache, v_cache, meta, self.scale, self.kv_scales).reshape(t, cfg.q_size)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantScheme | None = None):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, quant)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg, quant)

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

    def forward_small(self, s: torch.Tensor, ss: torch.Tensor, cos_sin: torch.Tensor,
                      kv_cache: torch.Tensor) -> None:
        """The same layer for a few rows on the GPU, in six launches (kiln.kernels.gemv): `s` is the
        residual stream, updated in place; ss [3, T] float32 holds the sums of squares of its rows
        at this layer's input (filled), after attention and at the output (both accumulated here,
        zero on entry)."""
        from kiln.kernels.gemv import gemv

        attn, mlp = self.attn, self.mlp
        w, b, q = small_linear_args(attn.qkv_proj)
        qkv = gemv(s, w, b, norm_weight=self.input_norm.weight, ss_in=ss[0], eps=self.input_norm.eps, **q)
        out = attn.attend(qkv, cos_sin, kv_cache)
        w, b, q = small_linear_args(attn.o_proj)
        gemv(out, w, b, residual=s, ss_out=ss[1], **q)
        w, b, q = small_linear_args(mlp.gate_up_proj)
        act = gemv(s, w, b, glu=True, norm_weight=self.post_attn_norm.weight, ss_in=ss[1],
                   eps=self.post_attn_norm.eps, **q)
        w, b, q = small_linear_args(mlp.down_proj)
        gemv(linear_input(mlp.down_proj, act), w, b, residual=s, ss_out=ss[2], **q)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantScheme | None = None):
        super().__init__()
        self.cfg = cfg
        self.quant = quant
        # Pass the (meta) weight in: a random init would be wasted work, and normal_ on the meta
        # device imports torch._dynamo (about a second of load time).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, quant) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rope_table: torch.Tensor,
                kv_caches: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: [layers, 2, blocks, block_size, kv_heads, hd].

        Returns the final hidden states [T, hidden], after the last norm.
        """
        cos_sin = rope_table.index_select(0, positions)
        if input_ids.shape[0] <= SMALL_BATCH_ROWS and use_kernels(rope_table):
            return self._forward_small(input_ids, cos_sin, kv_caches)
        h, residual = self.embed_tokens(input_ids), None
        for layer, kv in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos_sin, kv)
        return self.norm(h, residual)[0]

    def _forward_small(self, input_ids: torch.Tensor, cos_sin: torch.Tensor,
                       kv_caches: torch.Tensor) -> torch.Tensor:
        """A few tokens (decode at small batch): the residual stream and its rows' sums of squares
        flow from one fused small-batch linear layer to the next (DecoderLayer.forward_small)."""
        from kiln.kernels.norm import embed_rows, rms_norm

        n = len(self.layers)
        ss = torch.zeros(2 * n + 1, input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        s = embed_rows(self.embed_tokens.weight, input_ids, ss[0])
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            layer.forward_small(s, ss[2 * i:2 * i + 3], cos_sin, kv)
        return rms_norm(s, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for the selected final hidden states [N, hidden]."""
        weight = self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        if h.shape[0] <= SMALL_BATCH_ROWS and use_kernels(h):
            from kiln.kernels.gemv import gemv

            out = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
            return gemv(h, weight, out=out)  # rounded through the model dtype, as below
        return torch.nn.functional.linear(h, weight).float()

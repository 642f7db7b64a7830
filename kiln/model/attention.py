"""Paged attention: per-step metadata, writing new K/V into the block pool, and the torch reference.

The reference path gathers each sequence's keys through its block table into a padded batch and runs
one masked SDPA call for the whole batch (prefills, prompt chunks, prefix-cache hits and decodes
alike): no Python loop over sequences, no host synchronization. It is the CPU path and the oracle the
GPU kernels are tested against.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from kiln.kernels import use_kernels
from kiln.model.layers import apply_rope


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, as device tensors built by the model runner."""

    # Integer tensors are int64 on the CPU, int32 on a GPU (one compiled variant of each kernel for
    # eager steps and graph replays alike).
    slot_mapping: torch.Tensor  # [T]: flat cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    seq_lens: torch.Tensor  # [B]: context length of each sequence after this step
    # The reference path's padded-batch layout (None in CUDA-graph steps, whose kernels need neither):
    query_pos: torch.Tensor | None  # [B, max_q]: absolute position of each query, 0 for padding
    query_index: torch.Tensor | None  # [T]: where each flat token goes in the [B * max_q] batch
    max_q: int
    max_kv: int  # max_blocks * block_size
    sliding_window: int | None = None
    # The prefill kernel's view (kiln.kernels.paged_prefill): [B + 1] first query row of each
    # sequence, and its work list of query tiles (sequence, first query).
    query_start: torch.Tensor | None = None
    tile_seq: torch.Tensor | None = None
    tile_start: torch.Tensor | None = None
    # The step is one sequence's tokens from position 0 with nothing before them (a fresh prompt,
    # or its first chunk): on a GPU its attention is plain causal attention over the step's own
    # keys, which SDPA's flash kernel runs faster than the paged prefill kernel.
    fresh: bool = False
    _bias: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def key_mask(self) -> torch.Tensor:
        """[B, 1, max_q, max_kv] bool: which keys each query may attend to."""
        kpos = torch.arange(self.max_kv, device=self.query_pos.device)
        q = self.query_pos[:, :, None]
        mask = (kpos[None, None, :] <= q) & (kpos[None, None, :] < self.seq_lens[:, None, None])
        if self.sliding_window is not None:
            mask &= q - kpos[None, None, :] < self.sliding_window
        return mask[:, None]

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`key_mask` as an additive bias (0 or -inf) in `dtype`, made once per step and shared by
        every layer (a boolean mask would be converted again inside each SDPA call)."""
        if self._bias is None or self._bias.dtype != dtype:
            mask = self.key_mask()
            self._bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf"))
        return self._bias


class _Context(threading.local):
    meta: AttentionMetadata | None = None


_CTX = _Context()


@contextlib.contextmanager
def attention_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Make `meta` the ambient metadata of one forward pass; nesting is a bug and is refused."""
    if _CTX.meta is not None:
        raise RuntimeError("attention_context is already active; forward passes cannot nest")
    _CTX.meta = meta
    try:
        yield meta
    finally:
        _CTX.meta = None


def current_metadata() -> AttentionMetadata:
    if _CTX.meta is None:
        raise RuntimeError("no attention metadata: run the model inside attention_context()")
    return _CTX.meta


KVScales = tuple[float, float] | None  # a layer's (k, v) scales of an fp8 cache (kiln.quant.kv_cache)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: KVScales = None) -> None:
    """Store [T, kv_heads, head_dim] keys/values at their slots of [blocks, block_size, kv_heads, hd]
    (as fp8 codes of k / k_scale and v / v_scale when `kv_scales` is given)."""
    kv_heads, hd = k_cache.shape[-2:]
    slot_mapping = slot_mapping.long()  # index_copy_ takes int64 indices only
    if kv_scales is not None:
        from kiln.quant.kv_cache import quantize_kv

        # index_copy_ has no fp8 kernel on the CPU: copy the codes' bytes
        k, v = quantize_kv(k, kv_scales[0]).view(torch.uint8), quantize_kv(v, kv_scales[1]).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, kv_heads, hd).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, hd).index_copy_(0, slot_mapping, v)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: KVScales = None) -> torch.Tensor:
    """Rotate q and k, store k and v at their cache slots, return the rotated q [T, heads, hd]:
    one Triton kernel on CUDA, `apply_rope` + `write_kv` (the reference) elsewhere."""
    if use_kernels(q):
        from kiln.kernels.rope_cache import rope_and_cache as kernel

        return kernel(q, k, v, cos_sin, k_cache, v_cache, slot_mapping, kv_scales=kv_scales)
    write_kv(k_cache, v_cache, apply_rope(k, cos_sin), v, slot_mapping, kv_scales)
    return apply_rope(q, cos_sin)


def fresh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, kv_scales: KVScales = None) -> torch.Tensor:
    """A fresh prompt on a GPU (`AttentionMetadata.fresh`): rotate, store the keys and values,
    then causal SDPA (flash) over the rotated q and k and the step's v, not through the cache
    (so unquantized, with an fp8 cache). Padding tokens after the prompt (a CUDA-graph bucket)
    come last, so no real query sees them."""
    from kiln.kernels.rope_cache import rope_and_cache as kernel

    q, k = kernel(q, k, v, cos_sin, k_cache, v_cache, meta.slot_mapping, with_k=True, kv_scales=kv_scales)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, kv_scales: KVScales = None) -> torch.Tensor:
    """Attention of flat queries [T, heads, hd] over the paged cache (fp8 codes dequantized with
    `kv_scales`); returns [T, heads, hd]."""
    t, heads, hd = q.shape
    b = meta.seq_lens.shape[0]
    kv_heads = k_cache.shape[-2]
    qp = q.new_zeros(b * meta.max_q, heads, hd).index_copy_(0, meta.query_index.long(), q)
    qp = qp.view(b, meta.max_q, heads, hd).transpose(1, 2)
    keys = k_cache[meta.block_tables].reshape(b, meta.max_kv, kv_heads, hd).transpose(1, 2)
    values = v_cache[meta.block_tables].reshape(b, meta.max_kv, kv_heads, hd).transpose(1, 2)
    if kv_scales is not None:
        from kiln.quant.kv_cache import dequantize_kv

        keys, values = dequantize_kv(keys, kv_scales[0], q.dtype), dequantize_kv(values, kv_scales[1], q.dtype)
    out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=meta.attn_bias(q.dtype), scale=scale,
                                         enable_gqa=kv_heads != heads)
    return out.transpose(1, 2).reshape(b * meta.max_q, heads, hd).index_select(0, meta.query_index)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, kv_scales: KVScales = None) -> torch.Tensor:
    """The attention a step runs. On a GPU: a batch of pure decodes (one query per sequence, no
    sliding window) goes to the Triton paged-decode kernel (split along the context), any other
    batch (prompts, chunks, prefix-cache tails, decodes mixed in) to the Triton prefill kernel.
    Elsewhere: the torch reference."""
    if use_kernels(q):
        if meta.max_q == 1 and meta.sliding_window is None:
            from kiln.kernels.paged_decode import paged_decode_attention

            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                          kv_scales=kv_scales)
        from kiln.kernels.paged_prefill import paged_prefill_attention

        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start, meta.tile_seq, meta.tile_start, scale,
                                       meta.sliding_window, kv_scales=kv_scales)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales)

"""Batched token sampling on the device, with no host synchronization.

Pipeline per row: penalties -> suppressed tokens (-inf) -> greedy rows take the argmax ->
temperature -> top-k -> top-p -> min-p -> seeded exponential race (Gumbel-max).

Randomness is a counter-based hash of (seed, step, token id) computed with int64 torch
ops, so the k-th token of a request is drawn from the same numbers on any device, at any
batch position and whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.engine.sampling_metadata import SamplingMetadata

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, without ever overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from a 63-bit seed and a step index (both int64 [B])."""
    seed_lo = seeds & _M32
    seed_hi = (seeds >> 32) & _M32
    a = _fmix32((seed_hi + 0x68E31DA4) & _M32)
    a = _fmix32(a ^ seed_lo)
    a = _fmix32((a + _mul32(steps & _M32, _GOLDEN)) & _M32)
    b = _fmix32(a ^ 0x5BD1E995)
    return a, b


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seed, step, token id)."""
    k1, k2 = row_keys(seeds, steps)
    idx = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    h = _fmix32((_mul32(idx, _GOLDEN)[None, :] + k1[:, None]) & _M32)
    h = _fmix32(h ^ k2[:, None])
    # Top 24 bits are exactly representable in float32: U = (m + 0.5) / 2**24.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32: chosen token under log_softmax(raw logits)
    top_ids: torch.Tensor | None  # [B, K] int64, K = largest requested logprobs count
    top_logprobs: torch.Tensor | None  # [B, K] float32


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if not meta.any_penalties or meta.output_counts is None:
        return logits
    counts = meta.output_counts
    if meta.any_repetition_penalty:
        seen = counts > 0
        if meta.prompt_mask is not None:
            seen = seen | meta.prompt_mask
        pen = meta.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalty[:, None] * counts
    logits = logits - meta.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def _apply_top_k_only(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Top-k without a full-vocab sort: threshold at the k-th largest via topk(max_k)."""
    max_k = meta.max_top_k
    values = torch.topk(logits, max_k, dim=-1).values
    k = meta.top_k
    idx = (k.clamp(min=1, max=max_k) - 1)[:, None]
    thresh = values.gather(1, idx)
    active = (k <= max_k)[:, None]
    thresh = torch.where(active, thresh, torch.full_like(thresh, float("-inf")))
    return logits.masked_fill(logits < thresh, float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    V = logits.shape[-1]
    pos = torch.arange(V, device=logits.device)[None, :]
    drop = pos >= meta.top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if meta.any_top_p:
        probs = torch.softmax(sorted_logits, dim=-1)
        exclusive = torch.cumsum(probs, dim=-1) - probs
        top_p = meta.top_p[:, None]
        # The top token always stays (its exclusive mass is 0 < top_p); top_p == 1 is off.
        drop = drop | ((exclusive >= top_p) & (top_p < 1.0) & (pos > 0))
    mask = torch.zeros_like(drop).scatter_(1, sorted_idx, drop)
    return logits.masked_fill(mask, float("-inf"))


def _apply_min_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    p_max = probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < meta.min_p[:, None] * p_max, float("-inf"))


class Sampler:
    """Callable: (logits [B, V], SamplingMetadata) -> SamplerOutput."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw = logits.to(torch.float32)
        x = apply_penalties(raw, meta)
        if meta.suppress_mask is not None:
            x = x.masked_fill(meta.suppress_mask, float("-inf"))

        if meta.all_greedy:
            token_ids = torch.argmax(x, dim=-1)
        else:
            sampled = self._sample(x, meta)
            if meta.any_greedy:
                token_ids = torch.where(meta.greedy, torch.argmax(x, dim=-1), sampled)
            else:
                token_ids = sampled

        logprobs_all = torch.log_softmax(raw, dim=-1)
        chosen = logprobs_all.gather(1, token_ids[:, None]).squeeze(1)
        top_ids = top_lp = None
        if meta.max_num_logprobs > 0:
            top_lp, top_ids = torch.topk(logprobs_all, meta.max_num_logprobs, dim=-1)
        return SamplerOutput(token_ids=token_ids, logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp)

    @staticmethod
    def _sample(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        x = x / meta.temperature[:, None]
        if meta.any_top_p:
            x = _apply_top_k_top_p(x, meta)
        elif meta.any_top_k:
            x = _apply_top_k_only(x, meta)
        if meta.any_min_p:
            x = _apply_min_p(x, meta)
        # Exponential race: argmax p_i / E_i with E_i = -log U_i, done in log space.
        u = uniform_noise(meta.seeds, meta.steps, x.shape[-1])
        e = -torch.log(u)
        return torch.argmax(x - torch.log(e), dim=-1)

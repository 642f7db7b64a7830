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

from kiln.engine.sampling_metadata import MIX_C3, WEYL, SamplingMetadata, mix32, row_keys

_M32 = 0xFFFFFFFF


def _token_hash(k1: torch.Tensor, k2: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """32-bit hash of (row keys, token id); token_ids is [V] (all rows) or [B, N]."""
    w = (token_ids * WEYL) & _M32
    h = mix32((w + k1[:, None]) & _M32)
    h = h ^ k2[:, None]  # second key: rows whose k1 differ by a Weyl multiple stay unrelated
    h = (h * MIX_C3) & _M32
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seed, step, token id)."""
    k1, k2 = row_keys(seeds, steps)
    ids = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    return _uniform(k1, k2, ids)


def _uniform(k1: torch.Tensor, k2: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return unit_interval(_token_hash(k1, k2, token_ids))


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms strictly inside (0, 1).

    U = (m + 0.5) / 2**23 for the top 23 bits m: m + 0.5 needs 24 significant bits, which float32
    holds exactly, so the largest U is 1 - 2**-24 < 1. (With 24 bits, m + 0.5 would round up to
    2**24 and give U = 1, -log(-log U) = inf: a uniformly random token, whatever the filters.)
    """
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _gumbel(meta: SamplingMetadata, token_ids: torch.Tensor) -> torch.Tensor:
    """-log(E) with E = -log(U): adding it to logits and taking the argmax is the
    exponential race argmax(p / E), i.e. a draw from softmax(logits)."""
    u = _uniform(meta.key1, meta.key2, token_ids)
    return -torch.log(-torch.log(u))


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
        if meta.all_sampling_top_k and not meta.any_top_p:
            return _sample_among_top_k(x, meta)
        if meta.any_top_p:
            x = _apply_top_k_top_p(x, meta)
        elif meta.any_top_k:
            x = _apply_top_k_only(x, meta)
        if meta.any_min_p:
            x = _apply_min_p(x, meta)
        return torch.argmax(x + _gumbel(meta, torch.arange(x.shape[-1], device=x.device)), dim=-1)


def _sample_among_top_k(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Every sampling row uses top-k: work on [B, max_k] candidates only.

    The noise is keyed by token id, so this draws exactly what the full-vocab path would.
    """
    max_k = meta.max_top_k
    vals, ids = torch.topk(x, max_k, dim=-1)
    pos = torch.arange(max_k, device=x.device)[None, :]
    vals = vals.masked_fill(pos >= meta.top_k[:, None], float("-inf"))
    if meta.any_min_p:
        vals = _apply_min_p(vals, meta)
    choice = torch.argmax(vals + _gumbel(meta, ids), dim=-1)
    return ids.gather(1, choice[:, None]).squeeze(1)

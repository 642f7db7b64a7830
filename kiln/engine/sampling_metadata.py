"""Per-step sampling settings of a batch, as device tensors plus host-side flags.

Built once per step from the requests that sample a token this step (one row each).
Host-side flags (``any_top_p``, ``all_greedy``...) come from Python metadata only, so the
sampler can pick its code path without ever reading a tensor back from the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kiln.engine.request import Request


_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64
# products never overflow and Python ints, CPU and GPU tensors all compute the same bits.
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x31848BAB
MIX_C3 = 0x2C1B3C6D
WEYL = 0x61C88647  # 2**32 - the golden ratio constant


def mix32(h):
    """A murmur3/lowbias32-style 32-bit finalizer; works on Python ints and int64 tensors."""
    h = h ^ (h >> 16)
    h = (h * MIX_C1) & _M32
    h = h ^ (h >> 15)
    h = (h * MIX_C2) & _M32
    return h ^ (h >> 16)


def _seed_key(seed):
    return mix32(mix32(((seed >> 32) + 0x68E31DA4) & _M32) ^ (seed & _M32))


_seed_key_host = functools.lru_cache(maxsize=8192)(_seed_key)


def row_keys(seed, step):
    """Two 32-bit keys from a 63-bit seed and a step index (Python ints or int64 tensors)."""
    a = _seed_key_host(seed) if isinstance(seed, int) else _seed_key(seed)
    a = mix32((a + (step & _M32) * WEYL) & _M32)
    return a, mix32(a ^ 0x5BD1E995)


def _flat_pairs(lists: list[list[int]]) -> torch.Tensor:
    """[2, N] int64 (row, id) pairs for ragged per-row id lists, built on the host."""
    lens = torch.tensor([len(x) for x in lists], dtype=torch.int64)
    ids = torch.tensor([t for x in lists for t in x], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(lists), dtype=torch.int64), lens)
    return torch.stack([rows, ids])


@dataclass(frozen=True)
class _StaticRow:
    """A request's sampling settings as the batch needs them: computed once per request (they
    never change), so a step's host work per row is the step-dependent part only."""

    vocab_size: int
    floats: list[float]  # temperature, top_p, min_p, repetition, presence, frequency
    top_k: int  # vocab_size when off
    seed: int
    nlp: int  # -1: no logprobs
    greedy: bool
    top_p_on: bool
    min_p_on: bool
    penalties: bool
    repetition: bool
    min_tokens: int
    suppress: list[int]  # suppressed while fewer than min_tokens are out: stop ids (+ EOS)

    @classmethod
    def of(cls, req: Request, V: int) -> "_StaticRow":
        p = req.params
        g = p.greedy
        ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            ids.update(req.eos_token_ids)
        return cls(
            vocab_size=V,
            floats=[1.0 if g else float(p.temperature), float(p.top_p), float(p.min_p),
                    float(p.repetition_penalty), float(p.presence_penalty), float(p.frequency_penalty)],
            top_k=min(p.top_k if p.top_k > 0 else V, V), seed=int(req.seed),
            nlp=-1 if p.logprobs is None else int(p.logprobs), greedy=g,
            top_p_on=p.top_p < 1.0, min_p_on=p.min_p > 0.0, penalties=p.uses_penalties,
            repetition=p.repetition_penalty != 1.0, min_tokens=p.min_tokens,
            suppress=sorted(i for i in ids if 0 <= i < V) if p.min_tokens else [],
        )


def _row(req: Request, vocab_size: int) -> _StaticRow:
    row = req.sampling_row
    if row is None or row.vocab_size != vocab_size:
        row = req.sampling_row = _StaticRow.of(req, vocab_size)
    return row


def plain_greedy(rows: list[Request], vocab_size: int, ahead: int = 0) -> bool:
    """Whether every row just takes the argmax of its raw logits this step: greedy, no logprobs,
    no penalties, no token suppressed (min_tokens). `ahead`: the step is scheduled that many
    tokens past the requests' host state (Scheduler.schedule_ahead)."""
    for req in rows:
        row = _row(req, vocab_size)
        if not row.greedy or row.nlp >= 0 or row.penalties or (
                row.suppress and req.num_output_tokens + ahead < row.min_tokens):
            return False
    return True


def samples_without_history(rows: list[Request], vocab_size: int) -> bool:
    """Whether the rows' next draws can be made before their previous tokens reach the host:
    no penalties (they count the output so far) and no logprobs (read back with the tokens)."""
    for req in rows:
        row = _row(req, vocab_size)
        if row.nlp >= 0 or row.penalties:
            return False
    return True


@dataclass
class SamplingMetadata:
    """Batch sampling state. Tensors are [B] unless noted; all live on ``device``."""

    batch_size: int
    vocab_size: int
    temperature: torch.Tensor  # float32; greedy rows hold 1.0 (they never divide)
    greedy: torch.Tensor  # bool: SamplingParams.greedy (temperature ~ 0 or top_k == 1)
    top_k: torch.Tensor  # int64; rows without top-k hold vocab_size
    top_p: torch.Tensor  # float32; 1.0 means off
    min_p: torch.Tensor  # float32; 0.0 means off
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    seeds: torch.Tensor  # int64
    steps: torch.Tensor  # int64: index of the output token being drawn
    key1: torch.Tensor  # int64: row_keys(seed, step), computed on the host
    key2: torch.Tensor  # int64
    num_logprobs: torch.Tensor  # int64: -1 none, 0 chosen only, k top-k alternatives
    # [B, V] float32 counts of each token in the output so far (only when penalties are used)
    output_counts: torch.Tensor | None
    # [B, V] bool: token occurs in the prompt (only when a row uses repetition_penalty)
    prompt_mask: torch.Tensor | None
    # [B, V] bool: tokens that must not be drawn this step (min_tokens); None if no row has any
    suppress_mask: torch.Tensor | None
    # Host-side flags.
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalties: bool
    any_repetition_penalty: bool
    all_sampling_top_k: bool  # every non-greedy row uses top-k (and there is one)
    max_top_k: int  # largest top_k among sampling rows that use it (0 if none)
    max_num_logprobs: int  # K of the top alternatives returned (0: none)
    any_logprobs: bool

    @classmethod
    def build(cls, rows: list[Request], vocab_size: int, device: torch.device | str,
              ahead: int = 0) -> "SamplingMetadata":
        """One row per request sampling this step. Host work only; copies are non-blocking.
        `ahead`: the step draws the token that many places past the requests' host state."""
        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()
        V = vocab_size

        def put(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if pin else t).to(device, non_blocking=True)

        floats: list[list[float]] = []  # per row: temperature, top_p, min_p, rep, presence, freq
        ints: list[list[int]] = []  # per row: top_k, seed, step, logprobs, key1, key2, greedy
        suppress: list[list[int]] = []
        out_ids: list[list[int]] = []
        prompt_ids: list[list[int]] = []
        max_top_k = max_nlp = 0
        any_top_k = any_top_p = any_min_p = any_greedy = any_pen = any_rep = any_lp = False
        all_greedy = all_sampling_top_k = True
        for req in rows:
            row = _row(req, V)
            g = row.greedy
            any_greedy |= g
            all_greedy &= g
            if not g:
                if row.top_k < V:
                    any_top_k = True
                    max_top_k = max(max_top_k, row.top_k)
                else:
                    all_sampling_top_k = False
                any_top_p |= row.top_p_on
                any_min_p |= row.min_p_on
            step = req.num_output_tokens + ahead
            k1, k2 = row_keys(row.seed, step)
            if row.nlp >= 0:
                any_lp = True
                max_nlp = max(max_nlp, row.nlp)
            floats.append(row.floats)
            ints.append([row.top_k, row.seed, step, row.nlp, k1, k2, int(g)])
            suppress.append(row.suppress if step < row.min_tokens else [])
            any_pen |= row.penalties
            any_rep |= row.repetition
            out_ids.append(req.output_token_ids if row.penalties else [])
            prompt_ids.append(req.prompt_token_ids if row.repetition else [])

        B = len(rows)
        f = put(torch.tensor(floats, dtype=torch.float32).reshape(B, 6).T.contiguous())
        n = put(torch.tensor(ints, dtype=torch.int64).reshape(B, 7).T.contiguous())

        def mask_from(lists: list[list[int]]) -> torch.Tensor:
            rc = put(_flat_pairs(lists))
            m = torch.zeros(B, V, dtype=torch.bool, device=device)
            return m.index_put_((rc[0], rc[1]), torch.ones((), dtype=torch.bool, device=device))

        output_counts = prompt_mask = None
        if any_pen:
            rc = put(_flat_pairs(out_ids))
            output_counts = torch.zeros(B, V, dtype=torch.float32, device=device)
            ones = torch.ones((), dtype=torch.float32, device=device).expand(rc.shape[1])
            output_counts.index_put_((rc[0], rc[1]), ones, accumulate=True)
            if any_rep:
                prompt_mask = mask_from(prompt_ids)
        suppress_mask = mask_from(suppress) if any(suppress) else None

        return cls(
            batch_size=B, vocab_size=V,
            temperature=f[0], top_p=f[1], min_p=f[2],
            repetition_penalty=f[3], presence_penalty=f[4], frequency_penalty=f[5],
            top_k=n[0], seeds=n[1], steps=n[2], num_logprobs=n[3], key1=n[4], key2=n[5],
            greedy=n[6].bool(),
            output_counts=output_counts, prompt_mask=prompt_mask, suppress_mask=suppress_mask,
            all_greedy=all_greedy, any_greedy=any_greedy, any_top_k=any_top_k,
            any_top_p=any_top_p, any_min_p=any_min_p, any_penalties=any_pen,
            any_repetition_penalty=any_rep,
            all_sampling_top_k=any_top_k and all_sampling_top_k, max_top_k=max_top_k,
            max_num_logprobs=min(max_nlp, V), any_logprobs=any_lp,
        )

"""Per-step sampling settings of a batch, as device tensors plus host-side flags.

Built once per step from the requests that sample a token this step (one row each).
Host-side flags (``any_top_p``, ``all_greedy``...) come from Python metadata only, so the
sampler can pick its code path without ever reading a tensor back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.engine.request import Request


def _host_tensor(data, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    t = torch.tensor(data, dtype=dtype)
    return t.pin_memory() if pin else t


def _padded(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    width = max(width, 1)
    return [r + [pad] * (width - len(r)) for r in rows]


@dataclass
class SamplingMetadata:
    """Batch sampling state. Tensors are [B] unless noted; all live on ``device``."""

    batch_size: int
    vocab_size: int
    temperature: torch.Tensor  # float32; greedy rows hold 1.0 (they never divide)
    greedy: torch.Tensor  # bool: temperature == 0 or top_k == 1
    top_k: torch.Tensor  # int64; rows without top-k hold vocab_size
    top_p: torch.Tensor  # float32; 1.0 means off
    min_p: torch.Tensor  # float32; 0.0 means off
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    seeds: torch.Tensor  # int64
    steps: torch.Tensor  # int64: index of the output token being drawn
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
    max_top_k: int  # largest top_k among sampling rows that use it (0 if none)
    max_num_logprobs: int  # K of the top alternatives returned (0: none)
    any_logprobs: bool

    @classmethod
    def build(cls, rows: list[Request], vocab_size: int, device: torch.device | str) -> "SamplingMetadata":
        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()
        V = vocab_size

        def put(data, dtype):
            return _host_tensor(data, dtype, pin).to(device, non_blocking=True)

        temps, greedy, top_k, top_p, min_p = [], [], [], [], []
        rep, pres, freq, seeds, steps, nlp = [], [], [], [], [], []
        suppress: list[list[int]] = []
        out_ids: list[list[int]] = []
        prompt_ids: list[list[int]] = []
        max_top_k = 0
        any_top_k = any_top_p = any_min_p = False
        for req in rows:
            p = req.params
            g = p.greedy
            greedy.append(g)
            temps.append(1.0 if g else float(p.temperature))
            k = p.top_k if p.top_k > 0 else V
            k = min(k, V)
            top_k.append(k)
            if not g and k < V:
                any_top_k = True
                max_top_k = max(max_top_k, k)
            top_p.append(float(p.top_p))
            any_top_p |= (not g) and p.top_p < 1.0
            min_p.append(float(p.min_p))
            any_min_p |= (not g) and p.min_p > 0.0
            rep.append(float(p.repetition_penalty))
            pres.append(float(p.presence_penalty))
            freq.append(float(p.frequency_penalty))
            seeds.append(int(req.seed))
            steps.append(req.num_output_tokens)
            nlp.append(-1 if p.logprobs is None else int(p.logprobs))
            sup: list[int] = []
            if req.num_output_tokens < p.min_tokens:
                ids = set(p.stop_token_ids)
                if not p.ignore_eos:
                    ids.update(req.eos_token_ids)
                sup = sorted(i for i in ids if 0 <= i < V)
            suppress.append(sup)
            uses_out = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
            out_ids.append(list(req.output_token_ids) if uses_out else [])
            prompt_ids.append(list(req.prompt_token_ids) if p.repetition_penalty != 1.0 else [])

        any_penalties = any(r.params.uses_penalties for r in rows)
        any_rep = any(r.params.repetition_penalty != 1.0 for r in rows)
        B = len(rows)

        def mask_from(ids: list[list[int]]) -> torch.Tensor:
            # Pad with V (an extra column dropped afterwards) so ragged rows scatter on device.
            idx = put(_padded(ids, V), torch.int64)
            m = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
            m.scatter_(1, idx, True)
            return m[:, :V]

        output_counts = prompt_mask = None
        if any_penalties:
            idx = put(_padded(out_ids, V), torch.int64)
            counts = torch.zeros(B, V + 1, dtype=torch.float32, device=device)
            counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=device))
            output_counts = counts[:, :V]
            if any_rep:
                prompt_mask = mask_from(prompt_ids)
        suppress_mask = mask_from(suppress) if any(suppress) else None

        max_nlp = max(nlp, default=-1)
        return cls(
            batch_size=B,
            vocab_size=V,
            temperature=put(temps, torch.float32),
            greedy=put(greedy, torch.bool),
            top_k=put(top_k, torch.int64),
            top_p=put(top_p, torch.float32),
            min_p=put(min_p, torch.float32),
            repetition_penalty=put(rep, torch.float32),
            presence_penalty=put(pres, torch.float32),
            frequency_penalty=put(freq, torch.float32),
            seeds=put(seeds, torch.int64),
            steps=put(steps, torch.int64),
            num_logprobs=put(nlp, torch.int64),
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            suppress_mask=suppress_mask,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_top_k=any_top_k,
            any_top_p=any_top_p,
            any_min_p=any_min_p,
            any_penalties=any_penalties,
            any_repetition_penalty=any_rep,
            max_top_k=max_top_k,
            max_num_logprobs=min(max(max_nlp, 0), V),
            any_logprobs=max_nlp >= 0,
        )

"""Perplexity of an engine on token windows: the accuracy gate's measure and `kiln eval ppl`'s.

Each window is one forward pass from position 0 (the engine's own model, kernels and KV pool),
with logits for every position: the mean negative log-likelihood of tokens 1..n-1 given the ones
before, over all windows; perplexity is its exp. The engine must be idle: the pass borrows blocks
from its pool and gives them back.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch

from kiln.engine.core import EngineCore
from kiln.engine.input_batch import ChunkSpec, prepare_inputs
from kiln.model.attention import attention_context

LOGIT_ROWS = 128  # rows of logits materialized at once ([rows, vocab] float32)


@contextlib.contextmanager
def window_forward(core: EngineCore, tokens: list[int]):
    """Run the engine's model over one window from position 0; yields the final hidden states
    [len, hidden]. The blocks it borrows from the pool are back when the context exits."""
    runner, pool = core.runner, core.scheduler.kv.pool
    if len(tokens) > core.manifest.profile.max_seq_len:
        raise ValueError(f"window of {len(tokens)} tokens exceeds the engine's max_seq_len "
                         f"{core.manifest.profile.max_seq_len}")
    need = -(-len(tokens) // runner.block_size)
    if core.has_unfinished() or pool.num_free < need:
        raise RuntimeError("perplexity needs an idle engine with a free KV block per "
                           f"{runner.block_size} tokens of the window")
    blocks = pool.allocate(need)
    try:
        inputs = prepare_inputs([ChunkSpec(tokens, 0, blocks)], runner.block_size, runner.device,
                                runner.cfg.sliding_window, runner.staging)
        with torch.inference_mode(), attention_context(inputs.attn):
            yield runner.model(inputs.input_ids, inputs.positions, runner.rope_table, runner.kv_caches)
    finally:
        pool.free(blocks)


def window_nll(core: EngineCore, tokens: list[int]) -> tuple[float, int]:
    """(sum of -log p(token_i | tokens_<i) for i >= 1, number of predicted tokens) of one window."""
    if len(tokens) < 2:
        return 0.0, 0
    model = core.runner.model
    with window_forward(core, tokens) as hidden:
        targets = torch.tensor(tokens[1:], device=hidden.device)
        total = 0.0
        for r0 in range(0, len(tokens) - 1, LOGIT_ROWS):
            r1 = min(r0 + LOGIT_ROWS, len(tokens) - 1)
            logp = torch.log_softmax(model.compute_logits(hidden[r0:r1]), dim=-1)
            total -= logp.gather(1, targets[r0:r1, None]).sum().item()
    return total, len(tokens) - 1


def perplexity(core: EngineCore, windows: list[list[int]], progress: bool = False, desc: str = "perplexity") -> dict:
    """{"ppl", "nll" (mean per token), "tokens" (predicted), "windows"} over all windows."""
    from tqdm import tqdm

    nll = n = 0
    for w in tqdm(windows, desc=desc, unit="window", file=sys.stderr, disable=not progress):
        s, k = window_nll(core, w)
        nll += s
        n += k
    if n == 0:
        raise ValueError("no tokens to score: give windows of at least 2 tokens")
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "windows": len(windows)}

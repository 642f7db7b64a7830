"""Perplexity of an engine (kiln.quant.perplexity) against transformers' loss on the same tokens."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kiln.build.builder import build_engine
from kiln.engine.core import EngineCore, EngineOptions
from kiln.quant.perplexity import perplexity
from tiny_models import VOCAB, make_hf_dir


@pytest.mark.parametrize("family", ["smollm2-gqa-tied", "qwen2-qkv-bias"])
def test_matches_transformers_loss(tmp_path, family):
    hf = make_hf_dir(family, tmp_path / "hf")
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "engine", dtype="float32", max_seq_len=128,
                          max_batch_size=4, max_num_tokens=256, block_size=8, progress=False)
    core = EngineCore(engine, EngineOptions(device="cpu", kv_cache_memory=4 << 20))
    rng = random.Random(0)
    windows = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (40, 57, 2)]
    free0 = core.scheduler.kv.pool.num_free
    got = perplexity(core, windows)
    assert core.scheduler.kv.pool.num_free == free0  # borrowed blocks given back
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            loss = hf(torch.tensor([w]), labels=torch.tensor([w])).loss.item()  # mean over len - 1
            nll += loss * (len(w) - 1)
    n = sum(len(w) - 1 for w in windows)
    assert got["tokens"] == n and got["windows"] == 3
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    with pytest.raises(ValueError, match="exceeds the engine's max_seq_len"):
        perplexity(core, [[5] * 129])
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(core, [[5]])

"""Decode steps and single-sequence prefills replayed from CUDA graphs.

On every machine: the graphs' staging layouts (token ids, positions, cache slots, lengths, block
tables, attention tiles, padding rows) against the eager path's `prepare_inputs`, an independent
construction of the same numbers. On a GPU, also: graph replay and eager give the same logits and
the same greedy tokens, for batches that fill a bucket exactly and batches that are padded up to
one, for prompts alone in their step and for a prefix-cache hit's tail.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kiln.engine.cuda_graphs import _FIELDS, fill_inputs, fill_prefill, layout, prefill_layout
from kiln.engine.input_batch import ChunkSpec, prepare_inputs
from kiln.kernels.prefill_tiles import BLOCK_M


def test_fill_inputs_matches_prepare_inputs():
    rng = random.Random(0)
    bs, width = 4, 6
    n = 5
    positions = [0, 3, 4, 15, 23]  # block starts, a block's last slot, the table's last slot
    tables = [rng.sample(range(1, 100), p // bs + 1) for p in positions]
    tokens = [rng.randrange(1, 50) for _ in range(n)]
    n_fields, b = _FIELDS, 6  # bucket 6: a bucket whose fields need padding to stay 16-byte aligned
    s, size = layout(b, width)
    assert s % 4 == 0 and s >= b and size == n_fields * s + b * width
    h = np.full(size, -7, dtype=np.int32)  # stale values must all be overwritten
    fill_inputs(h, b, width, bs, tokens, positions, tables)

    ref = prepare_inputs([ChunkSpec([t], p, tab) for t, p, tab in zip(tokens, positions, tables)],
                         bs, torch.device("cpu"))
    assert h[:n].tolist() == ref.input_ids.tolist()
    assert h[s:s + n].tolist() == ref.positions.tolist()
    assert h[2 * s:2 * s + n].tolist() == ref.attn.slot_mapping.tolist()
    assert h[3 * s:3 * s + n].tolist() == ref.attn.seq_lens.tolist()
    tab = h[_FIELDS * s:].reshape(b, width)
    assert tab[:n, :ref.attn.block_tables.shape[1]].tolist() == ref.attn.block_tables.tolist()
    assert (tab[:n, ref.attn.block_tables.shape[1]:] == 0).all()
    # padding rows: token 0 at position 0 into slot 0 (the null block), one token of context
    for f, want in enumerate([0, 0, 0, 1]):
        assert (h[f * s + n:f * s + b] == want).all()
    assert (tab[n:] == 0).all()


def test_fill_prefill_matches_prepare_inputs():
    """A prompt chunk after 5 cached tokens, 70 new ones in the 128 bucket: the real rows match
    prepare_inputs; padding rows write the null slot; padding tiles start past the queries."""
    rng = random.Random(1)
    bs, width, t, start, n = 8, 12, 128, 5, 70
    table = rng.sample(range(1, 200), (start + n - 1) // bs + 1)
    tokens = [rng.randrange(1, 50) for _ in range(n)]
    f, size = prefill_layout(t, width)
    assert all(o % 4 == 0 for o, _ in f.values())  # 16-byte aligned fields
    h = np.full(size, -7, dtype=np.int32)
    fill_prefill(h, t, width, bs, tokens, start, table)
    ref = prepare_inputs([ChunkSpec(tokens, start, table)], bs, torch.device("cpu"))

    def get(name):
        o, k = f[name]
        return h[o:o + k]

    assert get("ids")[:n].tolist() == ref.input_ids.tolist() and (get("ids")[n:] == 0).all()
    assert get("pos")[:n].tolist() == ref.positions.tolist() and (get("pos")[n:] == 0).all()
    assert get("slots")[:n].tolist() == ref.attn.slot_mapping.tolist() and (get("slots")[n:] == 0).all()
    assert get("len").tolist() == ref.attn.seq_lens.tolist() == [start + n]
    assert get("qs").tolist() == ref.attn.query_start.tolist() == [0, n]
    tiles = len(ref.attn.tile_seq)
    assert get("tseq").tolist() == [0] * (t // BLOCK_M)
    assert get("tstart")[:tiles].tolist() == ref.attn.tile_start.tolist()
    assert (get("tstart")[tiles:] >= n).all()
    assert get("row").tolist() == ref.logits_indices.tolist() == [n - 1]
    assert get("table")[:len(table)].tolist() == table and (get("table")[len(table):] == 0).all()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_replay_matches_eager(tmp_path, dtype):
    from kiln.build.builder import build_engine
    from kiln.engine.core import EngineCore, EngineOptions
    from kiln.engine.request import Request
    from kiln.sampling_params import SamplingParams
    from tiny_models import VOCAB, make_hf_dir

    make_hf_dir("llama2-mha", tmp_path / "hf")
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "engine", dtype=dtype, max_seq_len=128,
                          max_batch_size=16, max_num_tokens=256, block_size=8, progress=False)
    results = {}
    for graphs in (False, True):
        # one step at a time (no overlap), so that last_logits is the step's own
        core = EngineCore(engine, EngineOptions(device="cuda", kv_cache_memory=16 << 20, cuda_graphs=graphs,
                                                overlap_steps=False))
        assert (core.runner.graphs is not None) == graphs
        replays = []
        if graphs:
            real = core.runner.prefill_graphs.run
            core.runner.prefill_graphs.run = lambda *a: replays.append(len(a[0])) or real(*a)
        core.runner.capture_logits = True
        rng = random.Random(3)
        for i, n in enumerate([3, 9, 17, 30, 5, 12, 8, 20, 11, 7, 6]):  # 11 requests: buckets 16, 8...
            core.add_request(Request(f"r{i}", [rng.randrange(3, VOCAB) for _ in range(n)],
                                     SamplingParams(max_tokens=12 + i, temperature=0.0, ignore_eos=True)))
        logits, tokens = [], {}

        def drain():
            while core.has_unfinished():
                events = core.step()
                logits.append(core.runner.last_logits.cpu())
                for ev in events:
                    tokens.setdefault(ev.request.request_id, []).append(ev.token_id)

        drain()
        # one request at a time: its prompt is a single-sequence prefill (a prefill graph), then
        # the same prompt again plus new tokens (a prefix-cache hit: the graph computes the tail)
        prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 40, 16, 17)]
        prompts.append(prompts[1] + [rng.randrange(3, VOCAB) for _ in range(6)])
        for i, p in enumerate(prompts):
            core.add_request(Request(f"s{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
            drain()
        assert core.scheduler.stats()["prefix_hits"] >= 40 // 8 * 8
        if graphs:  # every single-sequence prompt step replayed a prefill graph (the hit: its tail)
            assert replays == [5, 40, 16, 17, 46 - 40 // 8 * 8]
        results[graphs] = (logits, tokens)
    (le, te), (lg, tg) = results[False], results[True]
    assert tg == te
    assert len(lg) == len(le)
    tol = 1e-4 if dtype == "float32" else 2e-3
    for a, b in zip(lg, le):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=0)


@cuda
def test_overlapped_graph_steps_match_stepwise(tmp_path):
    """Decode steps launched ahead (input tokens copied on the device from the step before's graph
    output, rows leaving at different lengths, seeded sampling outside the graph) give the tokens
    of one-step-at-a-time replays."""
    from kiln.build.builder import build_engine
    from kiln.engine.core import EngineCore, EngineOptions
    from kiln.engine.request import Request
    from kiln.sampling_params import SamplingParams
    from tiny_models import VOCAB, make_hf_dir

    make_hf_dir("llama3-gqa-rope-scaling", tmp_path / "hf")
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "engine", dtype="float16", max_seq_len=128,
                          max_batch_size=16, max_num_tokens=256, block_size=8, progress=False)
    results = {}
    for overlap in (False, True):
        core = EngineCore(engine, EngineOptions(device="cuda", kv_cache_memory=16 << 20, overlap_steps=overlap))
        assert core.runner.graphs is not None
        rng = random.Random(5)
        for i in range(12):
            params = (SamplingParams(max_tokens=5 + 3 * i, temperature=0.0, ignore_eos=True) if i % 2 else
                      SamplingParams(max_tokens=40 - i, temperature=0.8, top_k=20, seed=i, ignore_eos=True))
            core.add_request(Request(f"r{i}", [rng.randrange(3, VOCAB) for _ in range(3 + i)], params,
                                     seed=i))
        tokens: dict[str, list[int]] = {}
        while core.has_unfinished():
            for ev in core.step():
                tokens.setdefault(ev.request.request_id, []).append(ev.token_id)
        assert core.scheduler.stats()["free_blocks"] == core.scheduler.stats()["total_blocks"]
        results[overlap] = (tokens, core.num_ahead_steps)
    assert results[True][0] == results[False][0]
    assert results[False][1] == 0 and results[True][1] > 20


@cuda
def test_fresh_prompt_graphs_match_eager(tmp_path):
    """Prompts of more than 256 tokens from position 0 replay the fresh-prompt graphs (causal SDPA over the
    step's own keys); the same prompt extended (a prefix-cache hit) replays the paged-kernel graph
    for its tail. Logits and tokens agree with eager steps (kiln vs transformers on fresh prompts is
    test_model_parity's job)."""
    from kiln.build.builder import build_engine
    from kiln.engine.core import EngineCore, EngineOptions
    from kiln.engine.request import Request
    from kiln.sampling_params import SamplingParams
    from tiny_models import VOCAB, make_hf_dir

    make_hf_dir("llama3-gqa-rope-scaling", tmp_path / "hf")
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "engine", dtype="float16", max_seq_len=512,
                          max_batch_size=4, max_num_tokens=512, block_size=16, progress=False)
    rng = random.Random(9)
    first = [rng.randrange(3, VOCAB) for _ in range(300)]
    prompts = [first, first + [rng.randrange(3, VOCAB) for _ in range(100)]]
    results = {}
    for graphs in (False, True):
        core = EngineCore(engine, EngineOptions(device="cuda", kv_cache_memory=64 << 20, cuda_graphs=graphs,
                                                overlap_steps=False))
        core.runner.capture_logits = True
        keys = []
        if graphs:
            real = core.runner.prefill_graphs._replay
            core.runner.prefill_graphs._replay = lambda key, *a: keys.append(key) or real(key, *a)
        out = []
        for i, p in enumerate(prompts):
            core.add_request(Request(f"p{i}", p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)))
            while core.has_unfinished():
                evs = core.step()
                out.append((core.runner.last_logits.cpu(), [e.token_id for e in evs]))
        if graphs:
            assert keys == [(512, True), (128, False)]  # 300 fresh tokens; then 400 - 288 cached
        results[graphs] = out
    assert [t for _, t in results[True]] == [t for _, t in results[False]]
    for (a, _), (b, _) in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=3e-3 * b.abs().max().item(), rtol=0)

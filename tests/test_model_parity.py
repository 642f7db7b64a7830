"""Logits of kiln vs Hugging Face transformers (float32) for a tiny random model of every family.

For each step of a batched greedy run (prefill + 16 decode steps, prompts of different lengths, then a
request whose prefix comes from the cache), the logits kiln computed for a request are compared with
transformers' logits for the same tokens. kiln runs in float32 (tolerance 1e-4 of the largest logit),
and with KILN_TEST_DEVICE=cuda also in float16 (tolerance 1e-2: fp16 weights and activations against
the float32 reference), through the GPU path: Triton kernels and CUDA-graph decode.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kiln.build.builder import build_engine
from kiln.engine.core import EngineCore, EngineOptions
from kiln.engine.request import Request
from kiln.sampling_params import SamplingParams
from tiny_models import FAMILIES, VOCAB, make_hf_dir

BLOCK = 8
DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")  # e.g. cuda: the same comparison on a GPU
TOLS = {"float32": 1e-4, "float16": 1e-2}
DTYPES = ["float32"] + (["float16"] if DEVICE.startswith("cuda") else [])


@pytest.fixture(scope="module", params=[(f, d) for f in sorted(FAMILIES) for d in DTYPES],
                ids=lambda p: "-".join(p))
def family(request, tmp_path_factory):
    name, dtype = request.param
    root = tmp_path_factory.mktemp(name)
    hf = make_hf_dir(name, root / "hf")
    engine = build_engine(str(root / "hf"), root / "engine", dtype=dtype, max_seq_len=128,
                          max_batch_size=8, max_num_tokens=256, block_size=BLOCK, progress=False)
    return name, hf, engine, TOLS[dtype]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_capturing(core: EngineCore, reqs: list[Request]):
    """Run to completion; return [(request, context token ids, kiln logits)] for every sampled step."""
    core.runner.capture_logits = True
    for r in reqs:
        core.add_request(r)
    seen = []
    while core.has_unfinished():
        for i, ev in enumerate(core.step()):
            ctx = ev.request.all_token_ids[:-1]
            seen.append((ev.request, ctx, core.runner.last_logits[i].cpu()))
    return seen


def check_against_hf(hf, seen, tol: float) -> int:
    worst = 0.0
    with torch.no_grad():
        for req, ctx, logits in seen:
            ref = hf(torch.tensor([ctx])).logits[0, -1].float()
            err = rel_err(logits, ref)
            worst = max(worst, err)
            assert err <= tol, f"{req.request_id} at {len(ctx)} tokens: rel err {err:.2e}"
    return len(seen)


def greedy(max_tokens: int = 17) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_batch_prefill_and_decode_match_transformers(family):
    name, hf, engine, tol = family
    core = EngineCore(engine, EngineOptions(device=DEVICE, kv_cache_memory=8 << 20))
    rng = random.Random(1)
    lengths = [5, 13, 21] if "sliding" not in name else [5, 13, 30]
    reqs = [Request(f"r{i}", [rng.randrange(3, VOCAB) for _ in range(n)], greedy())
            for i, n in enumerate(lengths)]
    seen = run_capturing(core, reqs)
    assert check_against_hf(hf, seen, tol) == 17 * len(reqs)  # prefill + 16 decodes each
    assert all(len(r.output_token_ids) == 17 for r in reqs)
    assert core.scheduler.stats()["free_blocks"] == core.scheduler.stats()["total_blocks"]


def test_prefix_cache_hit_matches_transformers(family):
    _, hf, engine, tol = family
    core = EngineCore(engine, EngineOptions(device=DEVICE, kv_cache_memory=8 << 20))
    rng = random.Random(2)
    shared = [rng.randrange(3, VOCAB) for _ in range(2 * BLOCK + 3)]
    first = Request("a", shared, greedy(4))
    run_capturing(core, [first])
    second = Request("b", shared[: 2 * BLOCK] + [rng.randrange(3, VOCAB) for _ in range(6)], greedy())
    seen = run_capturing(core, [second])
    assert second.num_cached_tokens == 2 * BLOCK
    assert check_against_hf(hf, seen, tol) == 17


def test_single_fresh_prompt_matches_transformers(family):
    """One prompt from position 0, alone in its step: on a GPU its attention is causal SDPA over
    the step's own keys (AttentionMetadata.fresh), not the paged kernel (eager here: the graphs'
    fresh variants start at 512 tokens, see test_cuda_graphs)."""
    _, hf, engine, tol = family
    core = EngineCore(engine, EngineOptions(device=DEVICE, kv_cache_memory=8 << 20, cuda_graphs=False))
    rng = random.Random(4)
    req = Request("f", [rng.randrange(3, VOCAB) for _ in range(40)], greedy(3))
    assert check_against_hf(hf, run_capturing(core, [req]), tol) == 3


def test_small_batch_fused_path_matches_transformers(family, monkeypatch):
    """Steps of at most 16 tokens take the fused small-batch path on a GPU (LlamaModel._forward_small:
    kiln.kernels.gemv with norms, SiLU and residual adds folded in). On the CPU it is forced on here,
    its kernels running in Triton's interpreter; the prefill (13 tokens) and every decode take it."""
    import kiln.model.llama as llama

    name, hf, engine, tol = family
    if DEVICE == "cpu":
        monkeypatch.setattr(llama, "use_kernels", lambda t: True)
    calls = []
    real = llama.LlamaModel._forward_small
    monkeypatch.setattr(llama.LlamaModel, "_forward_small",
                        lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    core = EngineCore(engine, EngineOptions(device=DEVICE, kv_cache_memory=8 << 20, cuda_graphs=False))
    calls.clear()  # the GPU's load-time warm-up passes
    rng = random.Random(3)
    reqs = [Request(f"s{i}", [rng.randrange(3, VOCAB) for _ in range(n)], greedy(9))
            for i, n in enumerate([4, 9])]
    assert check_against_hf(hf, run_capturing(core, reqs), tol) == 9 * len(reqs)
    assert calls == [13] + [2] * 8

"""Offline engine benchmarks, no server: `kiln bench latency` and `kiln bench throughput`.

Prompts are random token ids, a different sequence for every request and every run, so the prefix
cache never turns a prefill into a hit; generation is greedy with `ignore_eos`, so every request
produces exactly the tokens asked for.

- latency: a batch of B requests started together; time to first token, decode ms/step (from the
  first token to the last, over output_len - 1 steps), output tokens/s, and the host's own time
  per step by phase (scheduling, input preparation and launches, waiting for the GPU, updates).
- throughput: N requests submitted at once, continuous batching; output and total tokens/s.
"""

from __future__ import annotations

import random
import time
from typing import Any

_SEEDS = iter(range(1, 1 << 30))


def random_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo = min(100, vocab_size // 2)
    return [[rng.randrange(lo, vocab_size) for _ in range(length)] for _ in range(count)]


def _sync(llm) -> None:
    if llm.core.runner.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def _params(tokens: int):
    from kiln.sampling_params import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


def _prompts(llm, count: int, length: int) -> list[list[int]]:
    return random_prompts(llm.core.manifest.model.vocab_size, count, length, next(_SEEDS))


def warm_up(llm, batch: int = 1, input_len: int = 16, output_len: int = 4) -> None:
    llm.generate(_prompts(llm, batch, input_len), _params(output_len))
    _sync(llm)


def latency(llm, batch_size: int = 1, input_len: int = 128, output_len: int = 128,
            iters: int = 3) -> dict[str, Any]:
    """The best of `iters` runs (each with fresh prompts) of one batch started together."""
    runs = []
    for _ in range(iters):
        prompts = _prompts(llm, batch_size, input_len)
        core = llm.core
        steps0, times0 = core.num_steps, dict(core.step_seconds)
        _sync(llm)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, _params(output_len))
        elapsed = time.perf_counter() - t0
        metrics = [o.outputs[0].metrics for o in outs]
        steps = core.num_steps - steps0
        first = max(m.first_token_time for m in metrics)
        decode_steps = output_len - 1
        run = {
            "elapsed_s": elapsed,
            "ttft_ms": 1e3 * (first - min(m.arrival_time for m in metrics)),
            "decode_ms_per_step": (1e3 * (max(m.finished_time for m in metrics) - first) / decode_steps
                                   if decode_steps else None),
            "output_tok_s": batch_size * output_len / elapsed,
            "steps": steps,
            "host_ms_per_step": {k: 1e3 * (v - times0[k]) / max(steps, 1)
                                 for k, v in core.step_seconds.items()},
        }
        runs.append(run)
    key = "decode_ms_per_step" if output_len > 1 else "ttft_ms"
    best = min(runs, key=lambda r: r[key])
    host = best["host_ms_per_step"]
    best["cpu_ms_per_step"] = host["schedule"] + host["prepare"] + host["update"]
    return {"batch_size": batch_size, "input_len": input_len, "output_len": output_len,
            "iters": iters, **_rounded(best)}


def throughput(llm, num_prompts: int = 1024, input_len: int = 128, output_len: int = 128) -> dict[str, Any]:
    prompts = _prompts(llm, num_prompts, input_len)
    core = llm.core
    steps0 = core.num_steps
    preempt0 = core.scheduler.stats().get("preemptions", 0)
    _sync(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, _params(output_len))
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return _rounded({
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "elapsed_s": elapsed, "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + num_prompts * input_len) / elapsed,
        "requests_per_s": num_prompts / elapsed, "steps": core.num_steps - steps0,
        "preemptions": core.scheduler.stats().get("preemptions", 0) - preempt0,
    })


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            v = round(v, 3)
        elif isinstance(v, dict):
            v = _rounded(v)
        out[k] = v
    return out


def engine_facts(llm) -> dict[str, Any]:
    """What the loaded engine is: device, dtype, weights, KV pool, load and capture times."""
    core, runner = llm.core, llm.core.runner
    facts = {
        "device": str(runner.device), "dtype": core.manifest.dtype_str,
        "weight_gib": round(runner.weight_bytes / 2**30, 3),
        "kv_pool_gib": round(runner.kv_cache_bytes / 2**30, 3),
        "kv_pool_tokens": runner.num_blocks * runner.block_size,
        "load_s": round(core.load_seconds, 3),  # engine directory -> ready, all included
        "runner_load_s": round(runner.load_seconds, 3),  # weights, KV pool, graphs (no verification)
        "cuda_graphs": runner.graphs.batch_sizes if runner.graphs is not None else None,
        "prefill_graphs": runner.prefill_graphs.buckets if runner.prefill_graphs is not None else None,
        "graph_capture_s": round(runner.graph_capture_seconds, 3),
        "eager_warmup_s": round(runner.warmup_seconds, 3),
    }
    if runner.device.type == "cuda":
        import torch

        facts["gpu"] = torch.cuda.get_device_name(runner.device)
        facts["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(runner.device) / 2**30, 3)
    return facts

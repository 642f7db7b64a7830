"""GPU smoke run of `kiln serve`: the HTTP server and its worker on CUDA, driven by the openai client.

With a random-weight model of SmolLM2-135M's shape (as in gpu_smoke.py), built with `kiln build`:
  1. starts `kiln serve ENGINE --device cuda` and times process start -> /ready 200;
  2. checks one greedy chat and one completion answer 200 with the expected token counts;
  3. runs C concurrent streaming completions of N tokens each (C = 1 and 32): output tok/s, TTFT and
     inter-token latency percentiles seen by the client, and the worker's mean engine-step time over
     the run (from /metrics: kiln:engine_step_seconds_total / kiln:engine_steps_total);
  4. SIGTERM: exit code 0, no child process left;
  5. for reference, the same engine offline (`LLM.generate`, same process) at batch 1 and 32.
Results are printed as JSON (and written to --json). Needs fastapi, uvicorn, pyzmq, msgspec, openai.

Usage: python benchmarks/gpu_serve_smoke.py [--tokens 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gpu_smoke import kiln_decode, make_model  # noqa: E402
from serve_helpers import ServerProcess, children, parse_metrics  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _steps(url: str) -> tuple[float, float]:
    import httpx

    m = parse_metrics(httpx.get(url + "/metrics").text)
    get = {name: v for (name, _), v in m.items()}
    return get["kiln:engine_steps_total"], get["kiln:engine_step_seconds_total"]


async def load(url: str, model: str, concurrency: int, tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    ttfts, itls, counts = [], [], []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        last, n = None, 0
        stream = await client.completions.create(
            model=model, prompt=f"w{3 + i} w5 w7 w11", max_tokens=tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if last is None:
                    ttfts.append(now - t0)
                else:
                    itls.append(now - last)
                last = now
            elif chunk.usage:
                n = chunk.usage.completion_tokens
        counts.append(n)

    await one(0)  # warm-up
    ttfts.clear(), itls.clear(), counts.clear()
    steps0, secs0 = await asyncio.to_thread(_steps, url)
    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(concurrency)])
    wall = time.perf_counter() - t0
    steps1, secs1 = await asyncio.to_thread(_steps, url)
    await client.close()
    return {"worker_steps": int(steps1 - steps0),
            "worker_mean_step_ms": round((secs1 - secs0) / max(1, steps1 - steps0) * 1e3, 2),
            "worker_busy_share": round((secs1 - secs0) / wall, 3),
            "concurrency": concurrency, "tokens_each": tokens, "all_complete": counts == [tokens] * concurrency,
            "wall_s": round(wall, 3), "output_tok_per_s": round(sum(counts) / wall, 1),
            "ttft_p50_ms": round(pct(ttfts, 0.5) * 1e3, 1), "ttft_p99_ms": round(pct(ttfts, 0.99) * 1e3, 1),
            "itl_p50_ms": round(pct(itls, 0.5) * 1e3, 2), "itl_p99_ms": round(pct(itls, 0.99) * 1e3, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    from openai import OpenAI

    tmp = Path(tempfile.mkdtemp(prefix="kiln-gpu-serve-"))
    make_model(tmp / "hf", torch.bfloat16)
    subprocess.run([sys.executable, "-m", "kiln.cli.main", "build", str(tmp / "hf"), "-o", str(tmp / "engine"),
                    "--no-progress"], check=True)
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    srv = ServerProcess(tmp / "engine", "--device", "cuda", "--kv-cache-memory", "4GiB")
    try:
        result["start_to_ready_s"] = round(srv.wait_ready(300), 2)
        model = "hf"
        c = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "w4 w9"}],
                                      max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        p = c.completions.create(model=model, prompt="w4 w9 w16", max_tokens=16, temperature=0, logprobs=2,
                                 extra_body={"ignore_eos": True})
        result["chat_ok"] = r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
        result["completion_ok"] = len(p.choices[0].logprobs.token_logprobs) == 16
        result["load"] = [asyncio.run(load(srv.url, model, conc, args.tokens)) for conc in (1, 32)]
        pid = srv.proc.pid
        srv.proc.send_signal(signal.SIGTERM)
        result["sigterm_exit_code"] = srv.proc.wait(60)
        result["children_left"] = len(children(pid))
    finally:
        if srv.proc.poll() is not None and srv.proc.returncode != 0:
            print(srv.output()[-4000:], file=sys.stderr)
        srv.close()
    from kiln import LLM

    llm = LLM(tmp / "engine", device="cuda", kv_cache_memory=4 << 30)
    prompt = list(range(100, 132))
    result["offline"] = [kiln_decode(llm, [[100 + i] + prompt[1:] for i in range(b)], args.tokens)
                         for b in (1, 32)]
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ok = (result["chat_ok"] and result["completion_ok"] and all(x["all_complete"] for x in result["load"])
          and result["sigterm_exit_code"] == 0 and result["children_left"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

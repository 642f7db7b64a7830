"""Paged decode attention on the GPU: a config sweep of kiln's kernel (kiln/kernels/paged_decode.py) on
the llama-2-7b shape (32 heads, 32 KV heads, head dim 128, blocks of 16), with the KV bandwidth it
reaches, and a check of each result against SDPA on the gathered context.

Cases are (batch, context): batch 1 at a short and a long context (the split count and the
shortest split matter), batches 64 and 256 at short contexts (KV bandwidth). Each timing is a CUDA
graph of 8 launches over 8 different caches (no launch finds its KV in L2), replayed 20 times.

With --fp8 the caches are E4M3 codes with one k and one v scale (kiln.quant.kv_cache): half the
bytes; the reference then attends over the values the codes stand for.

Usage: python benchmarks/gpu_decode_attention.py [--json OUT] [--fp8] [--cases B:N ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.kernels.paged_decode import paged_decode_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gemv import COPIES, timed  # noqa: E402  (a CUDA graph of 8 launches over 8 copies, 20 replays)

HEADS, KVH, D, BS = 32, 32, 128, 16
CASES = [(1, 192), (1, 2048), (64, 192), (256, 192), (256, 320)]


def reference(q, kc, vc, bt, n) -> torch.Tensor:
    out = []
    for i in range(q.shape[0]):
        blocks = bt[i, : -(-n // BS)]
        k = kc[blocks].reshape(-1, KVH, D)[:n].transpose(0, 1)
        v = vc[blocks].reshape(-1, KVH, D)[:n].transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[i][:, None], k, v, scale=D ** -0.5)[:, 0])
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--cases", nargs="+", help="batch:context pairs (default: CASES)")
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases] if args.cases else CASES
    ks, vs = 0.01, 0.01
    dev = torch.device("cuda")
    torch.manual_seed(0)
    configs = [None] + list(itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)))
    res: dict = {}
    for b, n in cases:
        width = 256  # the graphs' block-table width (max_seq_len 4096 / 16)
        nb = b * -(-n // BS) + 1
        kcs = [torch.randn(nb, BS, KVH, D, device=dev, dtype=torch.float16) for _ in range(COPIES)]
        vcs = [torch.randn(nb, BS, KVH, D, device=dev, dtype=torch.float16) for _ in range(COPIES)]
        bt = torch.zeros(b, width, dtype=torch.int32, device=dev)
        bt[:, : -(-n // BS)] = (torch.randperm(nb - 1, device=dev)[: b * -(-n // BS)] + 1).view(b, -1).int()
        sl = torch.full((b,), n, dtype=torch.int32, device=dev)
        q = torch.randn(b, HEADS, D, device=dev, dtype=torch.float16)
        gbytes = b * n * KVH * D * 2 * (1 if args.fp8 else 2) / 1e9
        scales = None
        if args.fp8:
            kcs = [(c / ks).clamp(-448, 448).to(torch.float8_e4m3fn) for c in kcs]  # the cast does not saturate
            vcs = [(c / vs).clamp(-448, 448).to(torch.float8_e4m3fn) for c in vcs]
            scales = (ks, vs)
            ref = reference(q, kcs[0].half() * ks, vcs[0].half() * vs, bt, n)
        else:
            ref = reference(q, kcs[0], vcs[0], bt, n)
        row: dict = {}
        splits_opts = [256, 128, 64] if b == 1 else [256]
        for cfg, ms in itertools.product(configs, splits_opts):
            key = f"{cfg}/min{ms}"
            try:
                fn = lambda i: paged_decode_attention(q, kcs[i], vcs[i], bt, sl, D ** -0.5,  # noqa: E731
                                                       min_split_tokens=ms, config=cfg, kv_scales=scales)
                got = fn(0)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                t = timed(fn)
                row[key] = {"us": round(t * 1e6, 2), "tb_s": round(gbytes / t / 1e3, 3), "rel_err": err,
                            "finite": bool(torch.isfinite(got).all())}
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                row[key] = repr(e)[:100]
        ok = {k: v for k, v in row.items() if isinstance(v, dict)}
        best = sorted(ok.items(), key=lambda kv: kv[1]["us"])[:5]
        print(f"b={b} ctx={n}: default {row.get('None/min256')} best {best}", flush=True)
        res[f"b{b}_ctx{n}"] = row
        kcs = vcs = None  # free this case's caches before the next
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

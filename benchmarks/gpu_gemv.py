"""Small-batch linear layers on the GPU: kiln's fused GEMV kernel (kiln/kernels/gemv.py) against
cuBLAS (F.linear, with the default and the cuBLASLt backend), on the llama-2-7b decode shapes.

Each timing is a CUDA graph of 8 launches over 8 different copies of the weight (so no launch finds
its weight in the 50 MB L2, as in a real forward pass), replayed 20 times; reported per launch, with
the weight bandwidth it reaches. First a config sweep at M = 1 per shape, then the best configs at
M = 1, 2, 4, 8, 16, plus the fused variants (norm prologue, gate|up with the SiLU epilogue, residual
epilogue) with the kernel's own config choice. A config is (BLOCK_M, BLOCK_N, BLOCK_K, warps,
stages); BLOCK_M = 1 is the one-row FMA path. Also checks every result against the torch reference (gemv_ref).

Usage: python benchmarks/gpu_gemv.py [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from kiln.kernels.gemv import gemv, gemv_ref

SHAPES = {  # name: (N, K, kind)
    "qkv": (12288, 4096, "norm"),
    "o_proj": (4096, 4096, "residual"),
    "gate_up": (22016, 4096, "norm_glu"),
    "down": (4096, 11008, "residual"),
    "lm_head": (32000, 4096, "plain"),
}
COPIES, REPLAYS = 8, 20
# fused variants: None (the kernel's own choice) and alternatives, for one row and for several
FUSED_CANDIDATES = {
    "qkv": ([None, (1, 32, 256, 4, 3), (1, 16, 256, 4, 3), (16, 32, 256, 4, 3)],
            [None, (16, 64, 256, 4, 3), (16, 32, 128, 4, 3), (16, 64, 128, 4, 4)]),
    "o_proj": ([None, (16, 16, 512, 4, 3), (16, 32, 256, 4, 5), (16, 32, 512, 4, 3, 2), (16, 32, 256, 4, 3, 2),
                (16, 64, 256, 4, 3, 2), (16, 32, 256, 4, 3, 4), (16, 64, 256, 4, 3, 4), (16, 128, 128, 4, 3, 4)],
               [None, (16, 16, 512, 4, 3), (16, 32, 256, 4, 5), (16, 32, 512, 4, 3, 2), (16, 64, 256, 4, 3, 4)]),
    "gate_up": ([None, (1, 8, 512, 4, 3), (1, 16, 128, 4, 4), (16, 32, 128, 4, 3)],
                [None, (16, 32, 256, 4, 3), (16, 16, 256, 4, 3), (16, 64, 128, 4, 3)]),
    "down": ([None, (16, 16, 512, 4, 3), (16, 32, 512, 4, 5), (16, 16, 1024, 4, 3), (16, 32, 512, 4, 3, 2),
              (16, 32, 256, 4, 3, 2), (16, 64, 256, 4, 3, 2), (16, 32, 256, 4, 3, 4), (16, 64, 256, 4, 3, 4),
              (16, 64, 512, 4, 3, 4)],
             [None, (16, 16, 512, 4, 3), (16, 32, 256, 4, 4), (16, 32, 512, 4, 3, 2), (16, 64, 256, 4, 3, 4)]),
    "lm_head": ([None], [None]),
}


def timed(fn_for_copy) -> float:
    """Seconds per launch of fn_for_copy(i), i over the weight copies, inside one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(COPIES):
            fn_for_copy(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(COPIES):
            fn_for_copy(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(REPLAYS):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / (REPLAYS * COPIES)


def kwargs_for(kind: str, m: int, k: int, n: int, dev) -> dict:
    kw = {}
    if kind.startswith("norm"):
        kw["norm_weight"] = torch.rand(k, device=dev, dtype=torch.float16) + 0.5
        kw["ss_in"] = torch.rand(m, device=dev) * k + 1.0
        kw["eps"] = 1e-5
    if kind.endswith("glu"):
        kw["glu"] = True
    if kind.endswith("residual"):
        kw["residual"] = torch.randn(m, n, device=dev, dtype=torch.float16) * 4
        kw["ss_out"] = torch.zeros(m, device=dev)
    return kw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--no-sweep", action="store_true", help="skip the M = 1 config sweep")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    configs = [(bm, bn, bk, w, st) for bm, bn, bk, w, st in
               itertools.product((1, 16), (16, 32, 64), (128, 256, 512), (4, 8), (3, 5))
               if not (bn == 64 and bk == 512) and not (w == 8 and bn == 16)]
    res: dict = {"configs": {}, "by_m": {}, "fused": {}, "cublas": {}, "cublaslt": {}, "check": {}}
    for name, (n, k, kind) in SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.float16) * k ** -0.5 for _ in range(COPIES)]
        gbytes = n * k * 2 / 1e9
        x1 = torch.randn(1, k, device=dev, dtype=torch.float16)
        sweep = {}
        for cfg in [] if args.no_sweep else configs:
            try:
                t = timed(lambda i: gemv(x1, ws[i], config=cfg))
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                sweep[str(cfg)] = repr(e)[:120]
                continue
            sweep[str(cfg)] = round(gbytes / t, 1)
        res["configs"][name] = sweep
        ranked = sorted((v, c) for c, v in sweep.items() if isinstance(v, float))[::-1]
        best = [eval(c) for _, c in ranked[:3]]
        res["by_m"][name] = {}
        res["cublas"][name] = {}
        res["cublaslt"][name] = {}
        res["fused"][name] = {}
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            res["by_m"][name][m] = {str(c): round(gbytes / timed(lambda i: gemv(x, ws[i], config=c)), 1)
                                    for c in best if m == 1 or c[0] > 1}
            torch.backends.cuda.preferred_blas_library("cublas")
            res["cublas"][name][m] = round(gbytes / timed(lambda i: F.linear(x, ws[i])), 1)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            res["cublaslt"][name][m] = round(gbytes / timed(lambda i: F.linear(x, ws[i])), 1)
            torch.backends.cuda.preferred_blas_library("cublas")
            xin = x
            n_out = n // 2 if kind.endswith("glu") else n
            kw = kwargs_for(kind, m, k, n_out, dev)
            res["fused"][name][m] = {}
            for cfg in FUSED_CANDIDATES[name][m > 1]:
                try:
                    t = timed(lambda i: gemv(xin, ws[i], config=cfg, **kw))
                    res["fused"][name][m][str(cfg)] = round(gbytes / t, 1)
                except Exception as e:
                    res["fused"][name][m][str(cfg)] = repr(e)[:100]
            cfg = None  # the kernel's own choice (kiln.kernels.gemv._config), checked for correctness
            kw = kwargs_for(kind, m, k, n_out, dev)
            kw2 = {a: (b.clone() if torch.is_tensor(b) else b) for a, b in kw.items()}
            y = gemv(xin, ws[0], config=cfg, **kw)
            r = gemv_ref(xin, ws[0], **kw2)
            if y is None:
                y, r = kw["residual"], kw2["residual"]
            err = ((y.float() - r.float()).abs().max() / r.float().abs().max()).item()
            res["check"][f"{name}/{m}"] = {"rel_err": err, "finite": bool(torch.isfinite(y).all())}
        print(name, "sweep best", ranked[:3], "by_m", res["by_m"][name], "cublas", res["cublas"][name],
              "cublaslt", res["cublaslt"][name], "fused", res["fused"][name], flush=True)
        del ws
        torch.cuda.empty_cache()
    print(json.dumps(res["check"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Quantized linear kernels on the GPU at llama-2-7b shapes: kiln's small-batch gemv streaming int8 /
fp8 codes against its fp16 weights, and quant_gemm (int8-weight, int8 x int8, fp8 x fp8) against
cuBLAS fp16 (F.linear), torch._int_mm and torch._scaled_mm, at prefill / large-batch row counts.

Timings are CUDA graphs over 8 weight copies (benchmarks/gpu_gemv.py's `timed`), per launch. Each
variant's result is checked against a float64 computation of its contract; config candidates are
swept and the best is reported with the default's time.

Usage: python benchmarks/gpu_quant_kernels.py [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gemv import COPIES, timed  # noqa: E402

from kiln.kernels.gemv import gemv  # noqa: E402
from kiln.kernels.quant_gemm import quant_gemm, quantize_activations  # noqa: E402
from kiln.quant.fp8 import quantize_rows_fp8  # noqa: E402
from kiln.quant.int8 import quantize_rows  # noqa: E402

SHAPES = {"qkv": (12288, 4096, "norm"), "o_proj": (4096, 4096, "residual"),
          "gate_up": (22016, 4096, "norm_glu"), "down": (4096, 11008, "residual")}
GEMV_CANDIDATES = [None, (1, 16, 512, 4, 3), (1, 32, 512, 4, 3), (1, 8, 1024, 4, 3), (1, 16, 1024, 4, 3),
                   (1, 8, 512, 4, 4), (1, 16, 256, 4, 4), (16, 32, 512, 4, 3), (16, 64, 512, 4, 3),
                   (16, 32, 512, 4, 4), (16, 64, 256, 4, 4), (16, 32, 512, 4, 3, 2), (16, 64, 512, 4, 3, 4),
                   (16, 32, 512, 4, 3, 4)]
GEMM_CANDIDATES = {
    "fp16a": [None, (128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
              (64, 128, 64, 8, 4, 4, 1), (128, 128, 64, 8, 8, 3, 1), (64, 256, 64, 8, 8, 3, 1),
              (128, 128, 64, 8, 4, 4, 1), (32, 128, 64, 8, 4, 4, 1)],
    "8bit": [None, (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4),
             (64, 128, 128, 8, 4, 4), (128, 128, 64, 8, 8, 4), (256, 128, 128, 8, 8, 3)],
}


SAVE = lambda: None  # noqa: E731  (main sets it: results are written after every row)


def sweep(row: dict, label: str, tag: str, candidates, fn, digits: int) -> float:
    """Time fn(i, cfg) for each config (None: the kernel's own choice); write the default's and the
    best's times and the best config into row under `tag`; return the best seconds."""
    best = None
    for cfg in candidates:
        try:
            t = timed(lambda i: fn(i, cfg))
        except Exception as e:  # a config that does not compile here
            print(f"  {label} {tag} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if cfg is None:
            row[f"{tag}_default_us"] = round(t * 1e6, digits)
        if best is None or t < best[0]:
            best = (t, cfg)
    row[f"{tag}_best_us"], row[f"{tag}_best_cfg"] = round(best[0] * 1e6, digits), best[1]
    return best[0]


def err(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def bench_gemv(quick: bool, out: list) -> list[dict]:
    for name, (n, k, kind) in SHAPES.items():
        glu = kind == "norm_glu"
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16).mul_(0.02) for _ in range(COPIES)]
        qi = [quantize_rows(w) for w in w16]
        qf = [quantize_rows_fp8(w) for w in w16]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ss = x.float().pow(2).sum(-1)
            nw = torch.ones(k, device="cuda", dtype=torch.float16)
            stream = torch.zeros(m, n, device="cuda", dtype=torch.float16)
            sso = torch.zeros(m, device="cuda")

            def call(w, extra, cfg):
                kw = dict(config=cfg, **extra)
                if kind.startswith("norm"):
                    kw.update(norm_weight=nw, ss_in=ss, eps=1e-5, glu=glu)
                    return gemv(x, w, **kw)
                gemv(x, w, residual=stream, ss_out=sso, **kw)
                return None

            row = {"shape": name, "m": m, "fp16_us": round(timed(lambda i: call(w16[i], {}, None)) * 1e6, 2)}
            cands = [c for c in (GEMV_CANDIDATES[:1] if quick else GEMV_CANDIDATES)
                     if c is None or not ((c[0] == 1 and m > 1) or (glu and len(c) > 5))]
            for tag, codes in (("int8", qi), ("fp8", qf)):
                t = sweep(row, f"{name} m={m}", tag, cands,
                          lambda i, cfg, codes=codes: call(codes[i][0], {"w_scale": codes[i][1]}, cfg), 2)
                row[f"{tag}_weight_tb_s"] = round(codes[0][0].numel() / t / 1e12, 2)
            if kind.startswith("norm"):  # correctness of the default config
                w, s = qi[0]
                ref = (x.double() @ (w.double() * s.double()[:, None]).T)
                y = gemv(x, w, w_scale=s, norm_weight=torch.ones(k, device="cuda", dtype=torch.float16),
                         ss_in=torch.full((m,), float(k), device="cuda"), eps=0.0)  # rstd 1: plain product
                if not glu:
                    row["int8_rel_err"] = round(err(y, ref), 6)
            print(json.dumps(row), flush=True)
            out.append(row)
            SAVE()
    return out


def bench_gemm(quick: bool, out: list) -> list[dict]:
    for name, (n, k, _kind) in SHAPES.items():
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16).mul_(0.02) for _ in range(2)]
        qi = [quantize_rows(w) for w in w16]
        qf = [quantize_rows_fp8(w) for w in w16]
        for m in ((256, 8192) if quick else (256, 2048, 8192)):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row = {"shape": name, "m": m, "n": n, "k": k}
            row["fp16_cublas_us"] = round(timed(lambda i: F.linear(x, w16[i % 2])) * 1e6, 1)
            xi, xsi = quantize_activations(x, "int8")
            xf, xsf = quantize_activations(x, "fp8")
            row["act_quant_int8_us"] = round(timed(lambda i: quantize_activations(x, "int8")) * 1e6, 1)
            variants = {
                "int8w": ("fp16a", lambda i, c: quant_gemm(x, qi[i % 2][0], qi[i % 2][1], config=c)),
                "w8a8": ("8bit", lambda i, c: quant_gemm(xi, qi[i % 2][0], qi[i % 2][1], a_scale=xsi,
                                                         out_dtype=torch.float16, config=c)),
                "fp8": ("8bit", lambda i, c: quant_gemm(xf, qf[i % 2][0], qf[i % 2][1], a_scale=xsf,
                                                        out_dtype=torch.float16, config=c)),
            }
            for tag, (cand, fn) in variants.items():
                t = sweep(row, f"{name} m={m}", tag, GEMM_CANDIDATES[cand][:1] if quick else GEMM_CANDIDATES[cand],
                          fn, 1)
                row[f"{tag}_tflops"] = round(2 * m * n * k / t / 1e12, 1)
            # torch's own int8 / fp8 GEMMs, with the scaling as a separate op where it is not fused
            try:
                row["torch_int_mm_us"] = round(timed(lambda i: (torch._int_mm(xi, qi[i % 2][0].T).float()
                                                               * xsi[:, None] * qi[i % 2][1]).half()) * 1e6, 1)
            except Exception as e:
                row["torch_int_mm_us"] = f"{type(e).__name__}"
            try:
                row["torch_scaled_mm_us"] = round(timed(lambda i: torch._scaled_mm(
                    xf, qf[i % 2][0].T, scale_a=xsf[:, None], scale_b=qf[i % 2][1][None, :],
                    out_dtype=torch.bfloat16)) * 1e6, 1)
            except Exception as e:
                row["torch_scaled_mm_us"] = f"{type(e).__name__}: {str(e)[:100]}"
            # correctness
            ref = (xi.double() @ qi[0][0].double().T) * xsi.double()[:, None] * qi[0][1].double()[None, :]
            row["w8a8_rel_err"] = round(err(quant_gemm(xi, qi[0][0], qi[0][1], a_scale=xsi,
                                                       out_dtype=torch.float16), ref), 6)
            ref = (x.double() @ qi[0][0].double().T) * qi[0][1].double()[None, :]
            row["int8w_rel_err"] = round(err(quant_gemm(x, qi[0][0], qi[0][1]), ref), 6)
            ref = (xf.double() @ qf[0][0].double().T) * xsf.double()[:, None] * qf[0][1].double()[None, :]
            row["fp8_rel_err"] = round(err(quant_gemm(xf, qf[0][0], qf[0][1], a_scale=xsf,
                                                      out_dtype=torch.float16), ref), 6)
            print(json.dumps(row), flush=True)
            out.append(row)
            SAVE()
        w16 = qi = qf = None
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="default configs only")
    ap.add_argument("--only", choices=["gemv", "gemm"])
    args = ap.parse_args()
    global SAVE
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "gemv": [], "gemm": []}
    if args.json:
        SAVE = lambda: args.json.write_text(json.dumps(res, indent=1) + "\n")  # noqa: E731
    if args.only != "gemm":
        bench_gemv(args.quick, res["gemv"])
    if args.only != "gemv":
        bench_gemm(args.quick, res["gemm"])
    SAVE()
    return 0


if __name__ == "__main__":
    sys.exit(main())

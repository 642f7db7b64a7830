"""Correctness check of every Triton kernel in kiln/kernels against an independent torch reference,
for a GPU benchmark to run before it times anything (on a CPU through Triton's interpreter).

Cases: rms_norm (+/- residual add), silu_mul, rope_and_cache (strided q/k/v views of a fused qkv
tensor, as the model passes them), embed_rows, paged_decode_attention, paged_prefill_attention and
gemv (RMSNorm prologue + bias, gate|up SiLU epilogue, residual epilogue, float32 out, plain), over
ragged context lengths on and next to 16-token block boundaries up to 2000 (several decode splits),
batches mixing a fresh prompt, a chunk with prior context, a prefix-hit tail and decodes, GQA ratios
1, 4, 8, head dims 64 and 128, 7B widths (gemv's N capped at 1000 under the interpreter, for time).
References: float64 from the same inputs, rounded to the model dtype only where the model's torch
path rounds. bfloat16 needs a GPU (the interpreter truncates casts to bfloat16 and its bfloat16
tl.dot multiplies bit patterns, triton-lang/triton#11584).

A case is ok when max|out - ref| / max|ref| (worst output) <= tol, no output is NaN/inf, every output
element was written and (decode, gemv) a second call gives the same bits (counters reset). Written:
while a kernel runs, torch.empty/empty_like (how every wrapper allocates outputs and scratch) return
tensors filled with a marker NaN bit pattern, as are buffers handed in to be written (embed_rows'
ss, gemv's out); elements still holding it afterwards were never written ("unwritten"). Unlike
poisoning the CUDA caching allocator this also works on a CPU. KV caches hold the marker outside the
context slots: attention must not read it (else NaN), and rope_and_cache must write exactly its
slot_mapping slots ("stray": elements changed elsewhere).

Usage: python benchmarks/gpu_kernel_check.py [--device cuda] [--dtype float16|bfloat16|float32]
       [--quick] [--json OUT]; exit status 1 if a case fails. On a CPU: --device cpu --dtype float32.
From a script: run_checks("cuda", torch.float16)["all_ok"]; on a CPU, TRITON_INTERPRET=1 must be set
before kiln.kernels is first imported (run_checks sets it, in time unless already imported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

BS = 16  # the engine's default block size
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Of max|ref|: about 4 float16 ulps (2^-10), 2 bfloat16 ulps (2^-7), 170 float32 ulps.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}
# A quiet NaN with a payload no arithmetic produces: (integer view dtype, bits) per float dtype.
MARK = {torch.float32: (torch.int32, 0x7FEDBEEF), torch.float16: (torch.int16, 0x7EAD),
        torch.bfloat16: (torch.int16, 0x7FED)}


def poison_(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in MARK:
        t.view(MARK[t.dtype][0]).fill_(MARK[t.dtype][1])
    return t


def marked(t: torch.Tensor) -> torch.Tensor:
    return t.view(MARK[t.dtype][0]) == MARK[t.dtype][1]


@contextlib.contextmanager
def poisoned():
    """torch.empty and torch.empty_like return marker-filled float tensors while active."""
    orig = torch.empty, torch.empty_like
    torch.empty, torch.empty_like = (lambda *a, **k: poison_(orig[0](*a, **k))), \
        (lambda *a, **k: poison_(orig[1](*a, **k)))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig


def rand(gen, *shape, scale=1.0, dt=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dt)


def rd(t: torch.Tensor, dt) -> torch.Tensor:  # round to the model dtype, back in float64
    return t.to(dt).double()


def layout(gen, seq_lens):
    """Block tables [B, width + 1] (int32, shuffled blocks, never block 0, a padding column)."""
    widths = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(widths) + 3
    perm, i = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist(), 0
    bt = torch.zeros(len(seq_lens), max(widths) + 1, dtype=torch.int32)
    for b, w in enumerate(widths):
        bt[b, :w] = torch.tensor(perm[i:i + w])
        i += w
    return bt, num_blocks


def slots_of(bt, seq_lens, q_lens):
    """Flat cache slots of the last q_len positions of each sequence."""
    pos = [torch.arange(n - ql, n) for n, ql in zip(seq_lens, q_lens)]
    return torch.cat([bt[b, p // BS].long() * BS + p % BS for b, p in enumerate(pos)])


def paged_cache(gen, dt, seq_lens, kv_heads, d):
    """Block tables and K, V caches: random at the sequences' context slots, the marker elsewhere."""
    bt, nb = layout(gen, seq_lens)
    ctx = slots_of(bt, seq_lens, seq_lens)
    caches = [poison_(torch.empty(nb, BS, kv_heads, d, dtype=dt)) for _ in range(2)]
    for c in caches:
        c.view(-1, kv_heads, d)[ctx] = rand(gen, len(ctx), kv_heads, d, dt=dt)
    return bt, *caches


def attention_ref(q, kc, vc, bt, seq_lens, q_lens, scale, window=None):
    """Each query over its sequence's keys up to its own position, softmax in float64."""
    heads, kvh, d = q.shape[1], kc.shape[2], kc.shape[3]
    out, row = [], 0
    for b, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        ctx = slots_of(bt[b:b + 1], [n], [n])
        k = kc.view(-1, kvh, d)[ctx].double().repeat_interleave(heads // kvh, 1)
        v = vc.view(-1, kvh, d)[ctx].double().repeat_interleave(heads // kvh, 1)
        s = torch.einsum("qhd,nhd->hqn", q[row:row + ql].double(), k) * scale
        qpos, kpos = torch.arange(n - ql, n)[:, None], torch.arange(n)[None, :]
        allowed = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
        out.append(torch.einsum("hqn,nhd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v))
        row += ql
    return torch.cat(out)


def c_rms(dev, dt, gen, rows, n, res):
    from kiln.kernels.norm import rms_norm
    x, w, eps = rand(gen, rows, n, dt=dt), rand(gen, n, scale=0.2, dt=torch.float64).add(1).to(dt), 1e-5
    r = rand(gen, rows, n, scale=4.0, dt=dt) if res else None
    with poisoned():
        y, s = rms_norm(x.to(dev), w.to(dev), eps, r.to(dev) if res else None)
    s_ref = rd(x.double() + r.double(), dt) if res else x.double()
    y_ref = rd(rd(s_ref * torch.rsqrt(s_ref.pow(2).mean(-1, keepdim=True) + eps), dt) * w.double(), dt)
    return [(y, y_ref)] + ([(s, s_ref)] if res else []), 0


def c_silu(dev, dt, gen, rows, i):
    from kiln.kernels.activation import silu_mul
    gu = rand(gen, rows, 2 * i, scale=3.0, dt=dt)
    with poisoned():
        y = silu_mul(gu.to(dev))
    g, u = gu.double().chunk(2, -1)
    return [(y, rd(rd(g * torch.sigmoid(g), dt) * u, dt))], 0


def c_rope(dev, dt, gen, heads, kvh, d, seq_lens, q_lens):
    from kiln.kernels.rope_cache import rope_and_cache
    bt, nb = layout(gen, seq_lens)
    slots = slots_of(bt, seq_lens, q_lens)
    pos = torch.cat([torch.arange(n - ql, n) for n, ql in zip(seq_lens, q_lens)])
    t, qs, kvs = len(slots), heads * d, kvh * d
    qkv = rand(gen, t, qs + 2 * kvs, dt=dt)
    q, k, v = (x.reshape(t, -1, d) for x in qkv.split([qs, kvs, kvs], -1))
    ang = pos.double()[:, None] / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cs = torch.cat([ang.cos(), ang.sin()], -1).float()  # as rope_cos_sin's table rows
    kc, vc = (poison_(torch.empty(nb, BS, kvh, d, dtype=dt)).to(dev) for _ in range(2))
    qkv_d = qkv.to(dev)  # the kernel reads strided views of the fused tensor
    qd, kd, vd = (x.reshape(t, -1, d) for x in qkv_d.split([qs, kvs, kvs], -1))
    with poisoned():
        qo = rope_and_cache(qd, kd, vd, cs.to(dev), kc, vc, slots.to(torch.int32).to(dev))
    c, s, h = cs.double()[:, None, :d // 2], cs.double()[:, None, d // 2:], d // 2

    def rot(x):
        return torch.cat([x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s], -1)
    kf, vf = kc.cpu().view(-1, kvh, d), vc.cpu().view(-1, kvh, d)
    other = torch.ones(nb * BS, dtype=torch.bool)
    other[slots] = False
    stray = int((~marked(kf[other])).sum() + (~marked(vf[other])).sum())
    return [(qo, rot(q.double())), (kf[slots], rot(k.double())), (vf[slots], v.double())], stray


def c_attn(dev, dt, gen, heads, kvh, d, seq_lens, q_lens=None, window=None):
    """paged_decode_attention (q_lens None: one query per sequence), else paged_prefill_attention."""
    from kiln.kernels.paged_decode import paged_decode_attention
    from kiln.kernels.paged_prefill import paged_prefill_attention
    from kiln.kernels.prefill_tiles import prefill_tiles
    bt, kc, vc = paged_cache(gen, dt, seq_lens, kvh, d)
    ql = q_lens or [1] * len(seq_lens)
    q, sl = rand(gen, sum(ql), heads, d, dt=dt), torch.tensor(seq_lens, dtype=torch.int32)
    tiles = [torch.from_numpy(a) for a in prefill_tiles(np.array(ql))]
    qs = torch.tensor([0, *np.cumsum(ql).tolist()], dtype=torch.int32)
    args = [x.to(dev) for x in (q, kc, vc, bt, sl, qs, *tiles)]

    def call():
        with poisoned():
            if q_lens is None:
                return paged_decode_attention(*args[:5], d ** -0.5)
            return paged_prefill_attention(*args, d ** -0.5, window)
    o = call()
    again = call() if q_lens is None else o  # the split merge's arrival counters must be reset
    note = "" if torch.equal(o, again) else "a second call differs"
    return [(o, attention_ref(q, kc, vc, bt, seq_lens, ql, d ** -0.5, window))], 0, note


def c_gemv(dev, dt, gen, m, n, k, mode):
    """mode: plain | norm (RMSNorm prologue + bias, as qkv) | glu (norm + gate|up SiLU, as gate_up)
    | res (residual epilogue, as o_proj/down) | out32 (float32 `out`, as the logits)."""
    from kiln.kernels.gemv import gemv
    glu, norm, eps = mode == "glu", mode in ("norm", "glu"), 1e-5
    x = rand(gen, m, k, scale=3.0 if norm else 1.0, dt=dt)
    w = rand(gen, (2 if glu else 1) * n, k, scale=k ** -0.5, dt=dt)
    bias = rand(gen, n, scale=0.1, dt=dt) if mode == "norm" else None
    nw = rand(gen, k, scale=0.2, dt=torch.float64).add(1).to(dt) if norm else None
    ss_in = x.float().pow(2).sum(-1) if norm else None
    r = rand(gen, m, n, scale=2.0, dt=dt) if mode == "res" else None
    ss_out = torch.full((m,), 5.0) if mode == "res" else None  # accumulated into
    xd, wd, bd, nwd, ssd = (None if t is None else t.to(dev) for t in (x, w, bias, nw, ss_in))

    def call():  # -> (output, residual stream, its sums of squares)
        out = poison_(torch.empty(m, n, dtype=torch.float32)).to(dev) if mode == "out32" else None
        r_d, ss_d = (None if t is None else t.clone().to(dev) for t in (r, ss_out))  # updated in place
        with poisoned():
            y = gemv(xd, wd, bd, norm_weight=nwd, ss_in=ssd, eps=eps, glu=glu, residual=r_d, ss_out=ss_d,
                     out=out)
        return (out if mode == "out32" else y), r_d, ss_d
    (y, r_d, ss_d), again = call(), call()  # split-K's arrival counters must be reset
    same = torch.equal(r_d, again[1]) if mode == "res" else torch.equal(y, again[0])
    note = "" if same else "a second call differs"
    xr = x.double()
    if norm:
        xr = rd(rd(xr * torch.rsqrt(ss_in.double() / k + eps)[:, None], dt) * nw.double(), dt)
    ref = xr @ w.double().T + (bias.double() if bias is not None else 0.0)
    if glu:
        g, u = rd(ref[:, :n], dt), rd(ref[:, n:], dt)
        ref = rd(g * torch.sigmoid(g), dt) * u
    ref = rd(ref, dt)
    if mode == "res":
        s_ref = rd(r.double() + ref, dt)
        return [(r_d, s_ref), (ss_d, s_ref.pow(2).sum(-1) + 5.0)], 0, note
    return [(y, ref)], 0, note


def c_embed(dev, dt, gen, vocab, n, ids):
    from kiln.kernels.norm import embed_rows
    table, ids = rand(gen, vocab, n, dt=dt), torch.tensor(ids, dtype=torch.int64)
    ss = poison_(torch.empty(len(ids), dtype=torch.float32)).to(dev)
    with poisoned():
        y = embed_rows(table.to(dev), ids.to(dev), ss)
    rows = table[ids].double()
    return [(y, rows), (ss, rows.pow(2).sum(-1))], 0


def cases(quick: bool, interp: bool):
    """(kernel, builder, args) of each case."""
    heads = [(8, 8, 64), (32, 32, 128), (32, 8, 128), (32, 4, 128), (16, 2, 64)]  # GQA 1, 1, 4, 8, 8
    g1 = torch.Generator().manual_seed(1)
    ragged = [1, 15, 16, 17, 2000] + torch.randint(1, 300, (32,), generator=g1).tolist()
    rope_mix = ([37, 20, 16, 17, 2000], [37, 7, 1, 1, 1])  # prompt, chunk over a boundary, decodes
    pre_mix = ([100, 130, 70, 17, 300], [100, 66, 6, 1, 300])  # prompt, chunk, prefix-hit tail, decode
    cap = (lambda n: min(n, 1000)) if interp else (lambda n: n)
    gemvs = [("norm", 6144, 4096, (1, 5, 16)), ("glu", 11008, 4096, (1, 5, 16)), ("res", 4096, 4096, (1, 16)),
             ("res", 4096, 11008, (1, 16)), ("out32", 32000, 4096, (1, 16)), ("plain", 1000, 300, (3,))]
    out = []
    if quick:
        out += [("rms_norm", (7, 1001, True)), ("rms_norm", (1, 4096, False)), ("silu_mul", (3, 11008)),
                ("rope_and_cache", (8, 2, 64, [20, 17], [20, 1])),
                ("paged_decode", (16, 2, 128, [1, 16, 17, 70])), ("paged_decode", (4, 4, 64, [300])),
                ("paged_prefill", (8, 2, 64, [70, 17, 20], [70, 1, 4])),
                ("paged_prefill", (8, 1, 128, [33, 40], [33, 8]))]
        out += [("gemv", a) for a in [(1, 200, 512, "norm"), (5, 100, 300, "glu"), (3, 200, 256, "res"),
                                      (2, 100, 128, "out32")]]
        out += [("embed_rows", (50, 576, [7, 0, 49]))]
    else:
        out += [("rms_norm", (r, n, res)) for r in (1, 7, 256) for n in (4096, 1001) for res in (False, True)]
        out += [("silu_mul", (r, 11008)) for r in (1, 33, 256)]
        out += [("rope_and_cache", (*h, *rope_mix)) for h in heads]
        out += [("paged_decode", (*h, sl)) for h in heads for sl in ([2000], ragged)]
        out += [("paged_prefill", (*h, *pre_mix)) for h in heads]
        out += [("paged_prefill", (32, 8, 128, *pre_mix, 40))]  # a sliding window (Mistral)
        out += [("gemv", (m, cap(n), k, mode)) for mode, n, k, rows in gemvs for m in rows]
        out += [("embed_rows", (1000, 4096, ids)) for ids in ([999], [5, 0, 999, 5] * 4)]
    build = {"rms_norm": c_rms, "silu_mul": c_silu, "rope_and_cache": c_rope, "paged_decode": c_attn,
             "paged_prefill": c_attn, "gemv": c_gemv, "embed_rows": c_embed}
    return [(k, build[k], a) for k, a in out]


def shape_str(kernel, a) -> str:
    if kernel in ("rope_and_cache", "paged_decode", "paged_prefill"):
        lens = ",".join(map(str, a[3])) if len(a[3]) <= 6 else f"{len(a[3])} ragged 1..{max(a[3])}"
        extra = (" q=" + ",".join(map(str, a[4]))) if len(a) > 4 else ""
        return f"H={a[0]} KVH={a[1]} D={a[2]} ctx={lens}{extra}" + (f" window={a[5]}" if len(a) > 5 else "")
    if kernel == "embed_rows":
        return f"vocab={a[0]} N={a[1]} rows={len(a[2])}"
    names = {"rms_norm": "rows={} N={} residual={}", "silu_mul": "rows={} I={}", "gemv": "M={} N={} K={} {}"}
    return names[kernel].format(*a)


def summarize(kernel, shape, dt, pairs, stray, note) -> dict:
    err, nan, unwritten = 0.0, False, 0
    for out, ref in pairs:
        o, r = out.detach().cpu(), ref.double()
        if o.shape != r.shape:
            note += f"shape {tuple(o.shape)} != {tuple(r.shape)} "
            continue
        unwritten += int(marked(o).sum())
        o = o.double()
        fin = torch.isfinite(o)
        nan |= not bool(fin.all())
        diff = torch.where(fin, (o - r).abs(), torch.zeros((), dtype=torch.float64))
        err = max(err, float(diff.max() / r.abs().max().clamp_min(1e-30)))
    tol = TOL[dt]
    ok = not note and bool(pairs) and err <= tol and not nan and unwritten == 0 and stray == 0
    return {"kernel": kernel, "shape": shape, "max_rel_err": err, "tol": tol, "nan": nan,
            "unwritten": unwritten, "stray": stray, "note": note, "ok": ok}


def run_checks(device: str = "cuda", dtype=torch.float16, quick: bool = False) -> dict:
    dev = torch.device(device)
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    t0 = time.perf_counter()
    results = []
    for i, (kernel, fn, args) in enumerate(cases(quick, os.environ.get("TRITON_INTERPRET") == "1")):
        shape, pairs, stray, note = shape_str(kernel, args), [], 0, ""
        try:
            pairs, stray, *rest = fn(dev, dtype, torch.Generator().manual_seed(100 + i), *args)
            note = rest[0] if rest else ""
        except Exception as e:  # a case that cannot run fails; the others still run
            note = f"{type(e).__name__}: {e}"[:300]
        results.append(summarize(kernel, shape, dtype, pairs, stray, note))
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
            "dtype": str(dtype).removeprefix("torch."), "quick": quick, "cases": results,
            "all_ok": all(c["ok"] for c in results), "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--quick", action="store_true", help="a few small cases (CPU interpreter: < 1 min)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res = run_checks(args.device, DTYPES[args.dtype], args.quick)
    for c in res["cases"]:
        flags = " NaN" * c["nan"] + f" unwritten={c['unwritten']}" * bool(c["unwritten"]) + \
            f" stray={c['stray']}" * bool(c["stray"]) + f" {c['note']}" * bool(c["note"])
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['kernel']:<14} {c['shape']:<56} "
              f"err {c['max_rel_err']:.1e} / {c['tol']:.0e}{flags}")
    n_bad = sum(not c["ok"] for c in res["cases"])
    print(f"{len(res['cases']) - n_bad}/{len(res['cases'])} ok on {res['device']}, {res['dtype']}, "
          f"{res['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    sys.exit(1 if n_bad else 0)


if __name__ == "__main__":
    main()

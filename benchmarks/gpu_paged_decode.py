"""The Triton paged-decode kernel on a GPU: correctness against the torch reference path and time
per layer call, against that reference (block-table gather + SDPA), for 7B-class attention shapes.

For each (shape, batch, context): max abs error vs `paged_attention_ref` (fp16), every output
finite, and the median time of each over 50 calls (CUDA events), with the effective bandwidth of
the kernel (K and V bytes of the contexts read once / time). JSON to stdout and --json.

Usage: python benchmarks/gpu_paged_decode.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kiln.kernels.paged_decode import num_splits_for, paged_decode_attention
from kiln.model.attention import AttentionMetadata, paged_attention_ref

BS = 16
SHAPES = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}  # heads, kv heads, head dim


def timed(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def case(name: str, batch: int, context: int) -> dict:
    heads, kv_heads, d = SHAPES[name]
    blocks_per_seq = context // BS
    num_blocks = batch * blocks_per_seq + 1
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(num_blocks, BS, kv_heads, d, device="cuda", dtype=torch.float16, generator=g)
    vc = torch.randn(num_blocks, BS, kv_heads, d, device="cuda", dtype=torch.float16, generator=g)
    q = torch.randn(batch, heads, d, device="cuda", dtype=torch.float16, generator=g)
    bt = (torch.randperm(num_blocks - 1, device="cuda", generator=g)[: batch * blocks_per_seq] + 1)
    bt = bt.view(batch, blocks_per_seq).to(torch.int32)
    sl = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.int64, device="cuda"),
                             block_tables=bt.long(), seq_lens=sl.long(), query_pos=(sl.long() - 1)[:, None],
                             query_index=torch.arange(batch, device="cuda"), max_q=1, max_kv=blocks_per_seq * BS)
    scale = d ** -0.5
    out = paged_decode_attention(q, kc, vc, bt, sl, scale)
    ref = paged_attention_ref(q, kc, vc, meta, scale)
    res = {"shape": name, "batch": batch, "context": context,
           "splits": num_splits_for(batch, kv_heads, blocks_per_seq),
           "max_abs_err": float((out.float() - ref.float()).abs().max()), "finite": bool(torch.isfinite(out).all())}
    if batch * context <= 64 * 4096:  # the reference's gather needs memory for the whole padded batch
        res["ref_ms"] = round(timed(lambda: paged_attention_ref(q, kc, vc, meta, scale)), 4)
    res["triton_ms"] = round(timed(lambda: paged_decode_attention(q, kc, vc, bt, sl, scale)), 4)
    kv_bytes = 2 * batch * context * kv_heads * d * 2
    res["triton_tb_s"] = round(kv_bytes / (res["triton_ms"] * 1e-3) / 1e12, 3)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [case(n, b, c) for n in SHAPES for b, c in ((1, 512), (1, 4096), (64, 512), (64, 2048), (256, 512))]
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = all(r["finite"] and r["max_abs_err"] < 1e-2 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

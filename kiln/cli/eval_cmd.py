"""`kiln eval ppl ENGINE_DIR`: perplexity of any engine on held-out text (the accuracy gate's measure)."""

from __future__ import annotations

import argparse
import json
import time


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure an engine's accuracy",
                       description="Measure an engine's accuracy.")
    evsub = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    q = evsub.add_parser(
        "ppl", help="perplexity on held-out text",
        description="Perplexity of ENGINE_DIR on text cut into windows as the build's accuracy gate cuts "
                    "it: each text tokenized without special tokens, EOS between texts, full windows of "
                    "--seq-len tokens, each scored from position 0.")
    q.add_argument("engine_dir", metavar="ENGINE_DIR")
    q.add_argument("--data", default="builtin", metavar="FILE|builtin",
                   help="a plain-text or JSONL ('text' field) file, or the built-in corpus's held-out part "
                        "(default)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per window (default %(default)s)")
    q.add_argument("--max-tokens", type=int, metavar="N", help="score at most N tokens (default: all)")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    q.add_argument("--json", action="store_true", help="print the result as one JSON object")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from kiln.engine.core import pick_device
    from kiln.engine_dir import read_manifest
    from kiln.errors import KilnError
    from kiln.quant.build import MAX_SEQ_LEN, corpus, open_for_windows, text_windows
    from kiln.quant.perplexity import perplexity
    from kiln.quant.recipe import describe
    from kiln.tokenizer import Tokenizer

    m = read_manifest(args.engine_dir)
    if not 2 <= args.seq_len <= min(MAX_SEQ_LEN, m.profile.max_seq_len):
        raise KilnError(f"--seq-len must be in [2, {min(MAX_SEQ_LEN, m.profile.max_seq_len)}] for this engine")
    texts, desc = corpus(args.data, "held-out")
    tok = Tokenizer(str(m.tokenizer_path), m.chat_template, m.special_tokens, m.eos_token_ids)
    cap = None if args.max_tokens is None else args.max_tokens // args.seq_len
    windows = text_windows(tok, texts, args.seq_len, cap)
    if not windows:
        raise KilnError(f"the data has fewer than --seq-len {args.seq_len} tokens (or --max-tokens is below it)")
    device = str(pick_device(args.device))
    t0 = time.perf_counter()
    core = open_for_windows(m.path, device, args.seq_len)
    r = perplexity(core, windows, progress=not args.no_progress)
    r.update(engine=str(m.path), quant=describe(m.quant), data=desc["source"], seq_len=args.seq_len,
             device=device, seconds=round(time.perf_counter() - t0, 1))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['ppl']:.4f} over {r['tokens']} tokens ({r['windows']} windows of {args.seq_len}); "
              f"engine {m.path.name}, quantization {r['quant']}, {device}, {r['seconds']} s")
    return 0

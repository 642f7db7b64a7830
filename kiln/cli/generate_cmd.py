"""`kiln generate ENGINE_DIR --prompt ...`: one completion, streamed to stdout, speed on stderr."""

from __future__ import annotations

import argparse
import sys
import time

from kiln.cli.main import add_engine_options, add_sampling_options, engine_options, sampling_params


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt",
                       description="Generate text for one prompt from a built engine.")
    p.add_argument("engine_dir", help="engine directory, or 'default' for the embedded model")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt as a user message and apply the chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--n", type=int, default=1, help="number of choices")
    p.add_argument("--logprobs", type=int, help="print each token's logprob and N alternatives")
    p.add_argument("--quiet", action="store_true", help="no speed line on stderr")
    add_sampling_options(p, max_tokens=128)
    add_engine_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.llm import LLM

    params = sampling_params(args, n=args.n, logprobs=args.logprobs)
    llm = LLM(args.engine_dir, **engine_options(args))
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        msgs.append({"role": "user", "content": args.prompt})
        text = llm.tokenizer.apply_chat_template(msgs)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = llm.encode_prompt(args.prompt)
    t0 = time.perf_counter()
    rids = llm.add_request(ids, params)
    first = None
    done = {}
    for d in llm.stream():
        first = first or time.perf_counter()
        if d.output is not None:
            done[d.request_id] = d.output
        if args.n == 1:
            sys.stdout.write(d.text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    results = [done[r] for r in rids]
    if args.n > 1:
        for r in results:
            print(f"--- choice {r.index} ({r.finish_reason}) ---\n{r.text}")
    else:
        print()
    if args.logprobs is not None:
        for r in results:
            for lp in r.logprobs or []:
                alts = ", ".join(f"{llm.tokenizer.decode([t])!r}:{v:.3f}" for t, v in lp.top)
                print(f"{llm.tokenizer.decode([lp.token_id])!r}\t{lp.logprob:.4f}\t{alts}")
    if not args.quiet:
        n_out = sum(len(r.token_ids) for r in results)
        decode = elapsed - ((first or t0) - t0)
        print(f"[{len(ids)} prompt tokens, {n_out} generated in {elapsed:.2f} s: "
              f"{n_out / elapsed:.1f} tok/s; first token {((first or t0) - t0) * 1000:.0f} ms; "
              f"decode {max(n_out - args.n, 0) / decode if decode > 0 else 0:.1f} tok/s; "
              f"finish: {', '.join(str(r.finish_reason) for r in results)}]", file=sys.stderr)
    return 0

"""`kiln bench ...`: `latency` and `throughput` time an engine offline (no server); `soak` drives a
running server with mixed traffic and checks its health (see kiln/bench)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from kiln.errors import KilnError


def register(sub) -> None:
    p = sub.add_parser("bench", help="time an engine offline, or drive a running server with load",
                       description="Benchmarks: `latency` and `throughput` load an engine in this process "
                                   "and time it; `soak` drives a running OpenAI-compatible server.")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    _register_offline(bench)
    s = bench.add_parser(
        "soak", help="mixed traffic for a while, then check the server is healthy and leaked nothing",
        description="Send mixed traffic (chat and completions, streaming or not, ~10% cancelled by the "
                    "client, ~5% invalid on purpose) at a Poisson rate for some minutes, then check the "
                    "server: it goes idle, frees every KV block it took, and answered no 5xx. Prints a "
                    "table; exit 0 if healthy, 1 with a one-line reason if not.")
    s.add_argument("--base-url", required=True, metavar="URL",
                   help="the server, e.g. http://127.0.0.1:8000")
    s.add_argument("--minutes", type=float, required=True, metavar="M",
                   help="how long to send (0.25 = 15 s; at most 1440)")
    s.add_argument("--rate", type=float, required=True, metavar="R",
                   help="requests per second, on average (at most 1000)")
    s.add_argument("--model", metavar="NAME",
                   help="model name to send (default: the first of GET /v1/models)")
    s.add_argument("--api-key", metavar="KEY", help="bearer token (default: $KILN_API_KEY; none if unset)")
    s.add_argument("--seed", type=int, default=0, help="seed of the arrivals and the request mix (default 0)")
    s.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="requests ask for 1..N tokens; cancelled ones ask for N (default 64, at most 4096)")
    s.add_argument("--concurrency-limit", type=int, default=64, metavar="C",
                   help="most requests in flight; later arrivals wait for a slot (default 64)")
    s.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                   help="client-side limit per request; past it, a connection error (default 300)")
    s.add_argument("--server-pid", type=int, metavar="PID",
                   help="report the resident memory of this process and its descendants, start vs end")
    s.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    s.set_defaults(func=run)


def _register_offline(bench) -> None:
    from kiln.cli.main import add_engine_options

    lat = bench.add_parser(
        "latency", help="time to first token and decode ms/step of one batch started together",
        description="Load ENGINE_DIR and time batches of --batch-size random-token prompts started "
                    "together (greedy, exactly --output-len tokens each; the best of --iters runs): time "
                    "to first token, decode ms/step, output tokens/s, and the host's time per step by "
                    "phase. Prints JSON.")
    thr = bench.add_parser(
        "throughput", help="output tokens/s of many requests submitted at once",
        description="Load ENGINE_DIR and submit --num-prompts random-token prompts at once (continuous "
                    "batching; greedy, exactly --output-len tokens each). Prints JSON.")
    for q in (lat, thr):
        q.add_argument("engine_dir", metavar="ENGINE_DIR", help="an engine directory, or 'default'")
        q.add_argument("--input-len", type=int, default=128, metavar="N", help="prompt tokens (default 128)")
        q.add_argument("--output-len", type=int, default=128, metavar="N",
                       help="generated tokens per request (default 128)")
        q.add_argument("--json", metavar="FILE", help="also write the result here")
        add_engine_options(q)
    lat.add_argument("--batch-size", type=int, default=1, metavar="B", help="requests per batch (default 1)")
    lat.add_argument("--iters", type=int, default=3, metavar="K", help="timed runs; the best is kept (default 3)")
    thr.add_argument("--num-prompts", type=int, default=1024, metavar="N", help="requests (default 1024)")
    lat.set_defaults(func=run_offline)
    thr.set_defaults(func=run_offline)


def run_offline(args: argparse.Namespace) -> int:
    from kiln.bench import offline
    from kiln.cli.main import engine_options
    from kiln.llm import LLM

    out = Path(args.json) if args.json else None
    if out is not None and not out.parent.is_dir():
        raise KilnError(f"--json {out}: no directory {out.parent}")
    for name in ("input_len", "output_len", "batch_size", "num_prompts", "iters"):
        if getattr(args, name, 1) < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1")
    llm = LLM(args.engine_dir, **engine_options(args))
    if args.input_len + args.output_len > llm.max_seq_len:
        raise KilnError(f"--input-len + --output-len = {args.input_len + args.output_len} exceeds the "
                        f"engine's max_seq_len {llm.max_seq_len}")
    offline.warm_up(llm, getattr(args, "batch_size", 1))
    if args.bench_command == "latency":
        result = offline.latency(llm, args.batch_size, args.input_len, args.output_len, args.iters)
    else:
        result = offline.throughput(llm, args.num_prompts, args.input_len, args.output_len)
    report = {"engine": offline.engine_facts(llm), "result": result}
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from kiln.bench.soak import SoakConfig, format_report, run_soak

    out = Path(args.json) if args.json else None
    if out is not None and not out.parent.is_dir():
        raise KilnError(f"--json {out}: no directory {out.parent}")
    cfg = SoakConfig(
        base_url=args.base_url, minutes=args.minutes, rate=args.rate, model=args.model,
        api_key=args.api_key if args.api_key is not None else os.environ.get("KILN_API_KEY") or None,
        seed=args.seed, max_tokens=args.max_tokens, concurrency_limit=args.concurrency_limit,
        server_pid=args.server_pid, request_timeout=args.request_timeout)
    report = run_soak(cfg)
    print(format_report(report))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1

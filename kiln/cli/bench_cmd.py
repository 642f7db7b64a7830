"""`kiln bench ...`: load tools against a running server (see kiln/bench). Now: `soak`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from kiln.errors import KilnError


def register(sub) -> None:
    p = sub.add_parser("bench", help="drive a running server with load and check its health",
                       description="Load tools against a running OpenAI-compatible server.")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
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

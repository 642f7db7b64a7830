"""`kiln serve [ENGINE_DIR]`: the OpenAI-compatible HTTP server (see kiln/serve)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kiln.cli.main import add_engine_options, engine_options, parse_bytes
from kiln.errors import KilnError



def model_name(engine_dir: Path) -> str:
    """The name the engine's source had: a checkpoint directory's name, or a GGUF file's stem
    without its quantization suffix (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct);
    the engine directory's name when the source is unknown."""
    from kiln.engine_dir import read_manifest

    m = read_manifest(engine_dir)
    if m.dummy and m.source.get("dummy_of"):
        return f"dummy-{m.source['dummy_of']}"
    path = (m.source or {}).get("path")
    if not path:
        return engine_dir.resolve().name
    p = Path(path)
    return p.name.split(".")[0] if p.suffix == ".gguf" else p.name


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return parse


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve an engine over an OpenAI-compatible HTTP API",
                       description="Serve an engine over HTTP: /v1/chat/completions, /v1/completions, "
                                   "/v1/models, /tokenize, /detokenize, /health, /ready, /metrics, "
                                   "/version. SIGTERM drains: running requests finish, new ones get 503.")
    p.add_argument("engine_dir", nargs="?", default="default",
                   help="engine directory (default: the embedded SmolLM2-135M-Instruct, built on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send (default: the source checkpoint's name, "
                        "e.g. SmolLM2-135M-Instruct for the embedded model)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $KILN_API_KEY; none if unset)")
    p.add_argument("--metrics-auth", action="store_true", help="/metrics needs the API key too")
    p.add_argument("--max-queue", type=_positive(int), default=256,
                   help="most requests waiting for a slot; past that, 503 (default 256)")
    p.add_argument("--max-queued-tokens", type=_positive(int), default=1 << 20,
                   help="most prompt tokens waiting; past that, 503 (default 1048576)")
    p.add_argument("--request-timeout", type=_positive(float), default=600.0, metavar="S",
                   help="most seconds a request waits in the queue before 408 (default 600)")
    p.add_argument("--shutdown-timeout", type=_positive(float), default=30.0, metavar="S",
                   help="on SIGTERM, most seconds for running requests to finish (default 30)")
    p.add_argument("--max-body-bytes", type=parse_bytes, default=4 << 20, metavar="N",
                   help="largest request body; larger ones get 413 unread (default 4MiB)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; default: no CORS headers)")
    p.add_argument("--log-requests", action="store_true",
                   help="log prompts and outputs (off by default: they never reach the logs)")
    p.add_argument("--no-access-log", action="store_true", help="no per-request access log lines")
    p.add_argument("--allow-dummy", action="store_true",
                   help="serve a dummy engine (random weights, from `kiln build --dummy`), for benchmarks")
    add_engine_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.engine.options import EngineOptions
    from kiln.serve.server import serve
    from kiln.serve.state import ServeConfig

    if args.engine_dir == "default":
        from kiln.build.default_model import ensure_default_engine

        engine_dir = ensure_default_engine()
    else:
        engine_dir = Path(args.engine_dir)
        if not (engine_dir / "manifest.json").is_file():
            raise KilnError(f"{engine_dir} is not an engine directory (no manifest.json); "
                            f"build one with `kiln build`")
    from kiln.engine_dir import read_manifest

    if read_manifest(engine_dir).dummy and not args.allow_dummy:
        raise KilnError(f"{engine_dir} is a dummy engine (random weights: its text is meaningless); "
                        f"pass --allow-dummy to serve it anyway, e.g. for a benchmark")
    name = args.served_model_name or model_name(engine_dir)
    api_key = args.api_key if args.api_key is not None else os.environ.get("KILN_API_KEY")
    if api_key is not None and not api_key.strip():
        raise KilnError("the API key is empty (--api-key or KILN_API_KEY): give a key, or unset it "
                        "to serve without one")
    opts = engine_options(args)
    cfg = ServeConfig(
        engine_dir=engine_dir, served_model_name=name, api_key=api_key,
        max_num_seqs=opts.pop("max_num_seqs"), max_queue=args.max_queue,
        max_queued_tokens=args.max_queued_tokens, request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout, max_body_bytes=args.max_body_bytes,
        cors_origins=args.cors_origin, log_requests=args.log_requests, metrics_auth=args.metrics_auth,
        engine_options=EngineOptions(**opts))
    return serve(cfg, args.host, args.port, access_log=not args.no_access_log)

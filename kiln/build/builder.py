"""The offline build: a checkpoint in, an engine directory out.

The build reads each runtime tensor's checkpoint sources (see `kiln.model.layout`), checks their
shapes, fuses them along dim 0, casts to the engine dtype and streams the result into
`weights.safetensors`, one runtime tensor in memory at a time. Then `tokenizer.json` and, last,
`manifest.json`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from kiln.build.sources import SourceCheckpoint, open_source
from kiln.config import ModelConfig, ShapeProfile
from kiln.engine_dir import (
    DTYPES,
    ST_CODES,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    is_engine_dir,
    manifest_dict,
    write_manifest,
)
from kiln.errors import BuildError
from kiln.model.layout import WeightSpec, runtime_layout
from kiln.version import __version__
from kiln.weight_integrity import WeightHasher

if TYPE_CHECKING:
    from kiln.quant.build import QuantOptions

DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(dtype: str | torch.dtype, src: SourceCheckpoint) -> torch.dtype:
    """"auto" -> the source's dtype (float32 for a quantized GGUF); else the named dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise BuildError(f"unsupported engine dtype {dtype}; choose one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return src.dtype if src.dtype in DTYPES.values() else torch.float32
    if name not in DTYPES:
        raise BuildError(f"unsupported engine dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def _source_rows(cfg: ModelConfig, src_name: str, total: int, n_sources: int) -> int:
    """Rows (dim 0) one source contributes to a fused tensor."""
    if n_sources == 1:
        return total
    if ".q_proj." in src_name:
        return cfg.q_size
    if ".k_proj." in src_name or ".v_proj." in src_name:
        return cfg.kv_size
    if ".gate_proj." in src_name or ".up_proj." in src_name:
        return cfg.intermediate_size
    raise BuildError(f"cannot place {src_name} in a fused tensor")  # layout and builder disagree


def expected_source_shapes(cfg: ModelConfig, spec: WeightSpec) -> list[tuple[int, ...]]:
    n = len(spec.sources)
    return [(_source_rows(cfg, s, spec.shape[0], n), *spec.shape[1:]) for s in spec.sources]


def check_source(src: SourceCheckpoint, specs: list[WeightSpec]) -> None:
    """Every source tensor present, with the shape the layout expects; else one-line BuildError."""
    for spec in specs:
        for name, want in zip(spec.sources, expected_source_shapes(src.config, spec)):
            if not src.has_tensor(name):
                reason = getattr(src, "weights_error", None)
                raise BuildError(reason or f"source {src.path} is missing tensor {name}")
            got = src.tensor_shape(name)
            if tuple(got) != tuple(want):
                raise BuildError(f"tensor {name} has shape {tuple(got)}, expected {tuple(want)}")


def _dummy_tensor(spec: WeightSpec, index: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Seeded random weights (N(0, 0.02²); norms 1, biases 0), drawn on `device`: the same seed
    and device kind give the same bytes."""
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=dtype)
    if spec.name.endswith(".bias"):
        return torch.zeros(spec.shape, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(1000 + index)
    t = torch.randn(spec.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
    return t.cpu()


def fused_tensor(src: SourceCheckpoint, spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
    """One runtime tensor: its sources, concatenated along dim 0, cast, contiguous."""
    parts = []
    for name, want in zip(spec.sources, expected_source_shapes(src.config, spec)):
        t = src.get_tensor(name)
        if tuple(t.shape) != tuple(want):
            raise BuildError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(want)}")
        parts.append(t.to(dtype))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out.contiguous()


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """The 8-byte length + JSON header for tensors stored back to back in `entries` order.

    The header is padded with spaces so the data section starts 8-byte aligned, and carries no
    timestamps: the same entries always give the same bytes.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * (-(8 + len(js)) % 8)
    return struct.pack("<Q", len(js)) + js


def _write_tensor(f: BinaryIO, h: Any, t: torch.Tensor) -> int:
    data = t.view(torch.uint8).numpy() if t.dim() else t.reshape(1).view(torch.uint8).numpy()
    mv = memoryview(data).cast("B")
    f.write(mv)
    h.update(mv)
    return len(mv)


def write_weights(path: Path, specs: list[WeightSpec], dtype: torch.dtype, tensors, progress: bool,
                  desc: str) -> dict[str, Any]:
    """Stream `tensors` (one per spec, in order; a spec's own dtype, else `dtype`) into a
    safetensors file at `path`, fsync it, and return its manifest entry (size and sha256)."""
    from tqdm import tqdm

    want = [getattr(torch, s.dtype) if s.dtype else dtype for s in specs]
    header = safetensors_header([(s.name, d, s.shape) for s, d in zip(specs, want)])
    sha = WeightHasher()
    bar = tqdm(total=len(specs), desc=desc, unit="tensor", file=sys.stderr, disable=not progress)
    with open(path, "wb") as f:
        f.write(header)
        sha.update(header)
        for spec, d, t in zip(specs, want, tensors):
            if tuple(t.shape) != spec.shape or t.dtype != d:
                raise BuildError(f"{spec.name}: built {t.dtype} {tuple(t.shape)}, expected {d} {spec.shape}")
            _write_tensor(f, sha, t)
            bar.update()
            del t
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    return sha.manifest_entry(path.name, path.stat().st_size)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def build_engine(
    source: str | os.PathLike | SourceCheckpoint,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    profile: ShapeProfile | None = None,
    progress: bool = True,
    dummy: bool = False,
    *,
    device: str = "cpu",
    max_seq_len: int | None = None,
    max_batch_size: int | None = None,
    max_num_tokens: int | None = None,
    block_size: int | None = None,
    cuda_graph_batch_sizes: tuple[int, ...] | None = None,
    quant: "QuantOptions | None" = None,
) -> Path:
    """Build an engine directory at `out_dir` from `source`; return its path.

    `source`: "default" (the bundled SmolLM2-135M-Instruct GGUF), a Hugging Face checkpoint
    directory, a `.gguf` file, or an already opened `SourceCheckpoint`.
    `dtype`: "auto" (the checkpoint's dtype; float32 for a quantized GGUF), "float32", "float16"
    or "bfloat16". `profile`: the shapes the engine is built for (default `ShapeProfile()`);
    `max_seq_len`, `max_batch_size`, `max_num_tokens`, `block_size` override its fields.
    `dummy`: write deterministic random weights instead of reading the checkpoint's tensors
    (config and tokenizer still come from the source); the manifest records `"dummy": true`.
    A `kiln.build.dummy.DummySource` (a named architecture, `kiln build --dummy`) is always
    built dummy. `device`: where dummy weights are drawn (a GPU draws 7B of them in seconds), and
    where a quantized build calibrates, quantizes and measures perplexity.
    `quant`: kiln.quant.build.QuantOptions: the recipe, its calibration and the accuracy gate; a
    build that fails the gate raises BuildError and writes nothing.

    Output directory rules: a missing or empty `out_dir` is created; an existing kiln engine
    (it has a `manifest.json`) is replaced; any other non-empty directory is refused, so a build
    never deletes files it did not write. The engine is built in a hidden temporary directory
    next to `out_dir` and renamed into place only when complete (manifest written last), so a
    failed or interrupted build leaves no partial engine at `out_dir` and keeps the old one.
    """
    overrides = dict(
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        block_size=block_size,
        cuda_graph_batch_sizes=cuda_graph_batch_sizes,
    )
    profile_given = profile is not None
    profile = dataclasses.replace(
        profile or ShapeProfile(), **{k: v for k, v in overrides.items() if v is not None}
    )
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise BuildError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not is_engine_dir(out):
            raise BuildError(
                f"output directory {out} is not empty and is not a kiln engine; refusing to overwrite it"
            )
    if quant is not None:
        quant.check()
    src = source if isinstance(source, SourceCheckpoint) else open_source(source)
    dummy = dummy or src.kind == "dummy"
    try:
        profile = _fit_to_context(profile, src.config.max_position_embeddings,
                                  explicit=max_seq_len is not None or profile_given)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; an engine is an ordinary directory
        try:
            _build_into(src, tmp, resolve_dtype(dtype, src), profile, progress, dummy, device)
            if quant is not None and quant.active:
                from kiln.quant.build import quantize_engine

                quantize_engine(tmp, quant, device, progress)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if not isinstance(source, SourceCheckpoint):
            src.close()
    return out


def _fit_to_context(profile: ShapeProfile, context: int, explicit: bool) -> ShapeProfile:
    """Default max_seq_len is min(the model's context, 4096); an explicit larger one is refused."""
    if profile.max_seq_len <= context:
        return profile
    if explicit:
        raise BuildError(
            f"--max-seq-len {profile.max_seq_len} exceeds the model's context length {context}"
        )
    return dataclasses.replace(profile, max_seq_len=context)


def _build_into(
    src: SourceCheckpoint, tmp: Path, dtype: torch.dtype, profile: ShapeProfile, progress: bool, dummy: bool,
    device: str = "cpu",
) -> None:
    cfg = src.config
    specs = runtime_layout(cfg)
    if not dummy:
        check_source(src, specs)
    tok_info = src.tokenizer_info()  # before the long part: tokenizer problems fail fast

    tensors = (_dummy_tensor(spec, i, dtype, device) if dummy else fused_tensor(src, spec, dtype)
               for i, spec in enumerate(specs))
    weights_entry = write_weights(tmp / WEIGHTS_NAME, specs, dtype, tensors, progress, "building engine")

    src.write_tokenizer(tmp / TOKENIZER_NAME)
    manifest = manifest_dict(
        model=cfg,
        profile=profile,
        dtype=dtype,
        tokenizer={
            "file": TOKENIZER_NAME,
            "chat_template": tok_info.chat_template,
            "special_tokens": dict(tok_info.special_tokens),
            "eos_token_ids": list(tok_info.eos_token_ids),
        },
        weights=[weights_entry],
        source={"kind": src.kind, "path": str(src.path.absolute()), "files": src.file_hashes(),
                **getattr(src, "description", {})},
        versions={"kiln": __version__, "torch": torch.__version__},
        build_time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        dummy=dummy,
        quant=None,
    )
    write_manifest(tmp, manifest)

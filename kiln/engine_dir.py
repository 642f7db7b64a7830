"""The engine directory: its manifest schema, and loading what the build wrote (checking the
weight files' hashes is kiln.weight_integrity's job).

An engine directory holds `weights.safetensors` (runtime tensors, already fused and cast),
`tokenizer.json`, and `manifest.json`. The manifest is written last: its presence marks a
complete engine. Every refusal here is an `EngineLoadError` with one line naming the problem.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.config import SUPPORTED_ARCHITECTURES, ModelConfig, ShapeProfile
from kiln.errors import EngineLoadError, KilnError

if TYPE_CHECKING:
    import torch

FORMAT = "kiln-engine"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
TOKENIZER_NAME = "tokenizer.json"
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # engine dtypes

# Reading a manifest needs no torch (the HTTP server's process reads one and stays torch-free).
# The torch dtype tables below are built on first use: DTYPES (engine dtype name -> torch dtype),
# ST_DTYPES (safetensors code -> torch dtype) and ST_CODES (its inverse).
_ST_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@functools.cache
def _dtype_tables() -> dict[str, dict]:
    import torch

    st = {code: getattr(torch, name) for code, name in _ST_CODES.items()}
    return {"DTYPES": {n: getattr(torch, n) for n in DTYPE_NAMES}, "ST_DTYPES": st,
            "ST_CODES": {v: k for k, v in st.items()}}


def __getattr__(name: str):
    if name in ("DTYPES", "ST_DTYPES", "ST_CODES"):
        return _dtype_tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: "torch.dtype | str") -> str:
    """`torch.float16` (or "float16") -> "float16"."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class EngineManifest:
    """The parsed `manifest.json` of an engine directory at `path`."""

    path: Path
    model: ModelConfig
    profile: ShapeProfile
    dtype_str: str  # one of DTYPE_NAMES
    tokenizer: dict[str, Any]
    weights: list[dict[str, Any]]
    source: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)
    build_time: str | None = None
    dummy: bool = False
    quant: Any = None
    format_version: int = FORMAT_VERSION

    @property
    def dtype(self) -> "torch.dtype":
        return _dtype_tables()["DTYPES"][self.dtype_str]

    @property
    def quant_scheme(self):
        """The engine's kiln.quant.recipe.QuantScheme, or None when unquantized."""
        from kiln.quant.recipe import QuantScheme

        return QuantScheme.from_manifest(self.quant)

    @property
    def kv_cache_spec(self):
        """The engine's kiln.quant.kv_cache.KVCacheSpec (fp8 KV cache), or None (engine dtype)."""
        from kiln.quant.kv_cache import KVCacheSpec

        return KVCacheSpec.from_manifest(self.quant, self.model.num_layers)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.tokenizer["file"]

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.get("chat_template")

    @property
    def special_tokens(self) -> dict[str, str | None]:
        return dict(self.tokenizer.get("special_tokens") or {})

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.tokenizer.get("eos_token_ids") or ())

    @property
    def weight_paths(self) -> list[Path]:
        return [self.path / w["file"] for w in self.weights]

    def to_dict(self) -> dict[str, Any]:
        return manifest_dict(
            model=self.model,
            profile=self.profile,
            dtype=self.dtype_str,
            tokenizer=self.tokenizer,
            weights=self.weights,
            source=self.source,
            versions=self.versions,
            build_time=self.build_time,
            dummy=self.dummy,
            quant=self.quant,
        )


def manifest_dict(
    *,
    model: ModelConfig,
    profile: ShapeProfile,
    dtype: "torch.dtype | str",
    tokenizer: dict[str, Any],
    weights: list[dict[str, Any]],
    source: dict[str, Any],
    versions: dict[str, str],
    build_time: str | None,
    dummy: bool = False,
    quant: Any = None,
) -> dict[str, Any]:
    """The JSON-ready manifest (format `kiln-engine`, version `FORMAT_VERSION`)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.to_dict(),
        "dtype": dtype_name(dtype),
        "profile": profile.to_dict(),
        "tokenizer": tokenizer,
        "weights": weights,
        "source": source,
        "versions": versions,
        "build_time": build_time,
        "dummy": bool(dummy),
        "quant": quant,
    }


def write_manifest(engine_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` (atomically: temp file then rename) and fsync it."""
    path = Path(engine_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def is_engine_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(engine_dir: str | os.PathLike) -> EngineManifest:
    """Parse and check an engine directory's manifest; refuse anything this kiln cannot load."""
    root = Path(engine_dir)
    if not root.exists():
        raise EngineLoadError(f"engine directory not found: {root}")
    if not root.is_dir():
        raise EngineLoadError(f"not an engine directory (not a directory): {root}")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise EngineLoadError(
            f"not a kiln engine: {mpath} is missing (incomplete build? rebuild the engine)"
        )
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineLoadError(f"{mpath}: cannot parse manifest ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise EngineLoadError(f"{mpath}: manifest is not a JSON object")
    if raw.get("format") != FORMAT:
        raise EngineLoadError(f"{mpath}: unknown engine format {raw.get('format')!r} (expected {FORMAT!r})")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EngineLoadError(f"{mpath}: unknown engine format version {version!r}")
    if version > FORMAT_VERSION:
        raise EngineLoadError(
            f"engine format version {version} is newer than this kiln supports "
            f"({FORMAT_VERSION}); rebuild the engine or upgrade kiln"
        )
    try:
        model_d = raw["model"]
        arch = model_d.get("architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EngineLoadError(
                f"{mpath}: unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        model = ModelConfig.from_dict(model_d)
        profile = ShapeProfile.from_dict(raw["profile"])
        dtype_s = raw["dtype"]
        if dtype_s not in DTYPE_NAMES:
            raise EngineLoadError(f"{mpath}: unsupported engine dtype {dtype_s!r}")
        tokenizer = dict(raw["tokenizer"])
        tokenizer.setdefault("file", TOKENIZER_NAME)
        weights = [dict(w) for w in raw["weights"]]
        if not weights or any("file" not in w for w in weights):
            raise EngineLoadError(f"{mpath}: manifest lists no weight files")
        m = EngineManifest(
            path=root,
            model=model,
            profile=profile,
            dtype_str=dtype_s,
            tokenizer=tokenizer,
            weights=weights,
            source=dict(raw.get("source") or {}),
            versions=dict(raw.get("versions") or {}),
            build_time=raw.get("build_time"),
            dummy=bool(raw.get("dummy", False)),
            quant=raw.get("quant"),
            format_version=version,
        )
    except EngineLoadError:
        raise
    except (KilnError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise EngineLoadError(f"{mpath}: malformed manifest ({_one_line(e)})") from None
    try:
        m.quant_scheme
        m.kv_cache_spec
    except ValueError as e:
        raise EngineLoadError(f"{mpath}: {e}; rebuild the engine or upgrade kiln") from None
    for p in m.weight_paths:
        if not p.is_file():
            raise EngineLoadError(f"engine weight file missing: {p}; rebuild the engine")
    if not m.tokenizer_path.is_file():
        raise EngineLoadError(f"engine tokenizer file missing: {m.tokenizer_path}; rebuild the engine")
    return m


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """(data_start, header) of a safetensors file: byte offset of the data section, and its JSON."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EngineLoadError(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise EngineLoadError(f"{path.name}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EngineLoadError(f"{path.name}: bad safetensors header ({_one_line(e)})") from None
    if not isinstance(header, dict):
        raise EngineLoadError(f"{path.name}: bad safetensors header (not an object)")
    return 8 + n, header


def _map_file(path: Path) -> dict[str, torch.Tensor]:
    import torch

    data_start, header = read_safetensors_header(path)
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = _dtype_tables()["ST_DTYPES"][info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise EngineLoadError(f"{path.name}: bad safetensors entry for {name}") from None
        itemsize = torch.empty((), dtype=dt).element_size()
        numel = 1
        for s in shape:
            numel *= s
        start = data_start + begin
        if end - begin != numel * itemsize or data_start + end > size or begin < 0:
            raise EngineLoadError(f"{path.name}: tensor {name} has bad data offsets; rebuild the engine")
        if start % itemsize == 0:
            t = torch.empty(0, dtype=dt).set_(storage, start // itemsize, shape)
        else:  # misaligned: view as bytes, then copy into an aligned tensor
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
            t = raw[start : start + numel * itemsize].clone().view(dt).reshape(shape)
        out[name] = t
    return out


def load_weights(
    manifest: EngineManifest, device: str | torch.device = "cpu", check_layout: bool = True
) -> dict[str, torch.Tensor]:
    """The engine's runtime tensors by name.

    On CPU the tensors are views into a private (copy-on-write) memory map of the weight file:
    nothing is copied until written. On another device each tensor is copied there.
    With `check_layout`, names and shapes must match `runtime_layout(manifest.model)`.
    """
    import torch

    device = torch.device(device)
    tensors: dict[str, torch.Tensor] = {}
    for path in manifest.weight_paths:
        if not path.is_file():
            raise EngineLoadError(f"engine weight file missing: {path}; rebuild the engine")
        tensors.update(_map_file(path))
    if check_layout:
        from kiln.model.layout import runtime_layout

        expected = runtime_layout(manifest.model, manifest.quant_scheme)
        for spec in expected:
            t = tensors.get(spec.name)
            if t is None:
                raise EngineLoadError(f"engine is missing tensor {spec.name}; rebuild the engine")
            want = spec.dtype or manifest.dtype_str
            if dtype_name(t.dtype) != want:
                raise EngineLoadError(f"engine tensor {spec.name} is {dtype_name(t.dtype)}, expected {want}; "
                                      "rebuild the engine")
            if tuple(t.shape) != spec.shape:
                raise EngineLoadError(
                    f"engine tensor {spec.name} has shape {tuple(t.shape)}, expected {spec.shape}; "
                    "rebuild the engine"
                )
        extra = set(tensors) - {s.name for s in expected}
        if extra:
            raise EngineLoadError(f"engine has unexpected tensor {sorted(extra)[0]}; rebuild the engine")
    if device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors

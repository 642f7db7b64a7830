"""Build sources: what a checkpoint (HF directory or GGUF file) offers the builder.

`open_source(source)` turns a user's `--source` argument into a `SourceCheckpoint`, the one
interface the builder reads: a `ModelConfig`, tensors by Hugging Face name, the tokenizer, chat
template, special tokens, the source dtype, and hashes of the source files.
"""

from __future__ import annotations

import abc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.errors import BuildError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass
class TokenizerInfo:
    """Everything about the tokenizer that goes into the manifest."""

    chat_template: str | None = None
    special_tokens: dict[str, str | None] = field(
        default_factory=lambda: {k: None for k in SPECIAL_TOKEN_KEYS}
    )
    eos_token_ids: tuple[int, ...] = ()  # union of config, tokenizer and generation-config eos ids


class SourceCheckpoint(abc.ABC):
    """A checkpoint the builder can read. Subclasses fill in the tensor and tokenizer access.

    Tensors are read lazily, one per `get_tensor` call, as a torch tensor in float32 or the
    source's native dtype, shape [out, in] for linear weights (Hugging Face convention).
    """

    kind: str = ""
    weights_error: str | None = None  # why no tensors can be read at all, if so

    def __init__(self, path: Path, config: ModelConfig, dtype: torch.dtype):
        self.path = Path(path)
        self.config = config
        self.dtype = dtype  # the source's dtype: what `dtype="auto"` builds
        self._files: dict[str, str] | None = None

    # -- tensors -------------------------------------------------------------------------------
    @abc.abstractmethod
    def has_tensor(self, name: str) -> bool:
        ...

    @abc.abstractmethod
    def tensor_shape(self, name: str) -> tuple[int, ...]:
        ...

    @abc.abstractmethod
    def get_tensor(self, name: str) -> torch.Tensor:
        ...

    # -- tokenizer -----------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenizer_info(self) -> TokenizerInfo:
        ...

    @abc.abstractmethod
    def write_tokenizer(self, dest: Path) -> None:
        """Write the tokenizer as a `tokenizers` JSON file at `dest`."""
        ...

    # -- provenance ----------------------------------------------------------------------------
    @abc.abstractmethod
    def source_files(self) -> list[Path]:
        """The files the engine is built from (hashed into the manifest)."""
        ...

    def file_hashes(self) -> dict[str, str]:
        if self._files is None:
            out = {}
            for p in sorted(self.source_files()):
                rel = p.name if self.path.is_file() else p.relative_to(self.path).as_posix()
                out[rel] = sha256_path(p)
            self._files = out
        return dict(self._files)

    def close(self) -> None:
        pass

    def __enter__(self) -> "SourceCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sha256_path(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def merge_ids(*groups: Any) -> tuple[int, ...]:
    """Ordered union of token ids; each group is None, an int, or an iterable of ints."""
    out: list[int] = []
    for g in groups:
        if g is None:
            continue
        items = [g] if isinstance(g, int) else list(g)
        for i in items:
            if i is not None and int(i) not in out:
                out.append(int(i))
    return tuple(out)


def open_source(source: str | os.PathLike) -> SourceCheckpoint:
    """"default" -> the bundled SmolLM2 GGUF; a directory -> HF checkpoint; `*.gguf` -> GGUF."""
    s = str(source)
    if s == "default":
        from kiln.build.default_model import default_gguf_path

        s = str(default_gguf_path())
    path = Path(s).expanduser()
    if path.is_dir():
        from kiln.build.hf_reader import open_hf_checkpoint

        return open_hf_checkpoint(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from kiln.build.gguf_reader import open_gguf_checkpoint

        return open_gguf_checkpoint(path)
    if path.is_file():
        raise BuildError(
            f"unsupported source file {path}: expected a .gguf file or a Hugging Face checkpoint directory"
        )
    raise BuildError(f"source not found: {s}")

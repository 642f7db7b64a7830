"""Benchmark-sized engines without downloading weights: `kiln build --dummy ARCH`.

A `DummySource` has a real architecture's configuration (from its published `config.json`,
written out below), no tensors (the builder writes seeded random weights of the right shapes), and
the embedded default model's tokenizer. That tokenizer has 49,152 ids; for an architecture with a
smaller vocabulary (Llama 2: 32,000) it is cut down to the ids the model can embed (see
`shrink_tokenizer_json`). Text from a dummy engine is meaningless; its speed is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kiln.build.dummy_configs import ARCHITECTURES
from kiln.build.sources import SourceCheckpoint, TokenizerInfo
from kiln.config import ModelConfig
from kiln.errors import BuildError

def shrink_tokenizer_json(text: str, vocab_size: int) -> str:
    """A `tokenizers` BPE JSON restricted to ids < vocab_size: tokens at or past it are dropped,
    with every merge that makes or uses one. Byte-level BPE still encodes any text (with more,
    shorter tokens where a long one was dropped) and decodes it back unchanged."""
    tok = json.loads(text)
    model = tok.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise BuildError("the default tokenizer is not a BPE tokenizer; cannot fit it to a smaller vocabulary")
    kept = {t: i for t, i in vocab.items() if i < vocab_size}
    model["vocab"] = kept
    merges = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:
            merges.append(m)
    model["merges"] = merges
    tok["added_tokens"] = [t for t in tok.get("added_tokens") or [] if t["id"] < vocab_size]
    return json.dumps(tok, ensure_ascii=False)


class DummySource(SourceCheckpoint):
    """A named architecture with no weights (see the module docstring). `overrides` replace
    config.json fields (tests build small variants of the real shapes)."""

    kind = "dummy"
    weights_error = "a dummy source has no weights"

    def __init__(self, name: str, tokenizer_from: str | Path | None = None, **overrides: Any):
        if name not in ARCHITECTURES:
            raise BuildError(f"unknown dummy architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
        self.name = name
        config = ModelConfig.from_hf({**ARCHITECTURES[name], **overrides})
        if tokenizer_from is None:  # the embedded default model's GGUF
            from kiln.build.default_model import default_gguf_path
            from kiln.build.gguf_reader import GGUFCheckpoint

            self._tok_source = GGUFCheckpoint(default_gguf_path())
            path = self._tok_source.path
        else:  # an engine directory's tokenizer.json and manifest (no weights needed)
            self._tok_source = _EngineTokenizer(Path(tokenizer_from))
            path = self._tok_source.path
        super().__init__(path, config, torch.float16)

    @property
    def description(self) -> dict[str, Any]:
        return {"dummy_of": self.name}

    def has_tensor(self, name: str) -> bool:
        return False

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        raise BuildError(self.weights_error)

    def get_tensor(self, name: str) -> torch.Tensor:
        raise BuildError(self.weights_error)

    def tokenizer_info(self) -> TokenizerInfo:
        info = self._tok_source.tokenizer_info()
        v = self.config.vocab_size
        eos = tuple(dict.fromkeys(i for i in (*info.eos_token_ids, *self.config.eos_token_ids) if i < v))
        return TokenizerInfo(info.chat_template, dict(info.special_tokens), eos)

    def write_tokenizer(self, dest: Path) -> None:
        from tokenizers import Tokenizer

        text = self._tok_source.tokenizer_json()
        if self.config.vocab_size < Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True):
            text = shrink_tokenizer_json(text, self.config.vocab_size)
        Path(dest).write_text(text, encoding="utf-8")

    def source_files(self) -> list[Path]:
        return self._tok_source.source_files()  # the tokenizer's origin; the weights come from the seed

    def close(self) -> None:
        self._tok_source.close()


class _EngineTokenizer:
    """The tokenizer of an engine directory (tokenizer.json + the manifest's tokenizer entry)."""

    def __init__(self, engine_dir: Path):
        self.path = engine_dir
        try:
            self._entry = json.loads((engine_dir / "manifest.json").read_text(encoding="utf-8"))["tokenizer"]
            self._file = engine_dir / self._entry.get("file", "tokenizer.json")
            self._file.stat()
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise BuildError(f"cannot take a tokenizer from {engine_dir}: {' '.join(str(e).split())}") from None

    def tokenizer_info(self) -> TokenizerInfo:
        e = self._entry
        return TokenizerInfo(e.get("chat_template"), dict(e.get("special_tokens") or {}),
                             tuple(int(i) for i in e.get("eos_token_ids") or ()))

    def tokenizer_json(self) -> str:
        return self._file.read_text(encoding="utf-8")

    def source_files(self) -> list[Path]:
        return [self._file]

    def close(self) -> None:
        pass

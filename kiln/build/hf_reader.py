"""Read a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kiln.build.sources import SPECIAL_TOKEN_KEYS, SourceCheckpoint, TokenizerInfo, merge_ids
from kiln.config import ModelConfig
from kiln.errors import BuildError

_HF_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"cannot read {path}: {' '.join(str(e).split())}") from None


def _token_str(v: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or AddedToken dicts."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class HFCheckpoint(SourceCheckpoint):
    kind = "hf"

    def __init__(self, path: Path):
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise BuildError(f"no config.json in {path}; not a Hugging Face checkpoint directory")
        self.hf_config: dict[str, Any] = _read_json(cfg_path)
        config = ModelConfig.from_hf(self.hf_config)
        dtype_s = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "float32"
        dtype = _HF_DTYPES.get(str(dtype_s).removeprefix("torch."), torch.float32)
        super().__init__(path, config, dtype)
        self._weight_map = self._find_weights()
        self._handles: dict[str, Any] = {}
        self._tok_info: TokenizerInfo | None = None
        if not (path / "tokenizer.json").is_file():
            raise BuildError(
                f"no tokenizer.json in {path}; kiln needs a fast (tokenizers) tokenizer file"
            )

    # -- weights -------------------------------------------------------------------------------
    def _find_weights(self) -> dict[str, str]:
        """Tensor name -> safetensors file name (relative to the checkpoint directory)."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise BuildError(f"{index}: no weight_map")
            for fname in sorted(set(wm.values())):
                if not (self.path / fname).is_file():
                    raise BuildError(f"shard {fname} listed in {index.name} is missing from {self.path}")
            return {str(k): str(v) for k, v in wm.items()}
        files = [self.path / "model.safetensors"]
        if not files[0].is_file():
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                raise BuildError(
                    f"{self.path} has only PyTorch .bin weights; convert them to safetensors first"
                )
            # Not fatal here: a dummy build needs only config and tokenizer.
            self.weights_error = f"no model.safetensors or model.safetensors.index.json in {self.path}"
            return {}
        from safetensors import safe_open

        out: dict[str, str] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out.setdefault(k, f.name)
        return out

    def _handle(self, fname: str) -> Any:
        h = self._handles.get(fname)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(self.path / fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise BuildError(f"cannot read {self.path / fname}: {' '.join(str(e).split())}") from None
            self._handles[fname] = h
        return h

    def has_tensor(self, name: str) -> bool:
        return name in self._weight_map

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._weight_map[name]).get_slice(name).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        fname = self._weight_map.get(name)
        if fname is None:
            raise BuildError(self.weights_error or f"source {self.path} is missing tensor {name}")
        h = self._handle(fname)
        if name not in h.keys():
            raise BuildError(f"source is missing tensor {name} (index points to {fname})")
        return h.get_tensor(name)

    # -- tokenizer -----------------------------------------------------------------------------
    def tokenizer_info(self) -> TokenizerInfo:
        if self._tok_info is None:
            self._tok_info = self._read_tokenizer_info()
        return self._tok_info

    def _read_tokenizer_info(self) -> TokenizerInfo:
        tc_path = self.path / "tokenizer_config.json"
        tc = _read_json(tc_path) if tc_path.is_file() else {}
        specials = {k: _token_str(tc.get(k)) for k in SPECIAL_TOKEN_KEYS}
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = self.path / "chat_template.jinja"
        ct_json = self.path / "chat_template.json"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif not template and ct_json.is_file():
            template = _read_json(ct_json).get("chat_template")
        if not isinstance(template, str) or not template:
            template = None
        gen_eos = None
        gc = self.path / "generation_config.json"
        if gc.is_file():
            gen_eos = _read_json(gc).get("eos_token_id")
        tok_eos = None
        if specials["eos_token"] is not None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            tok_eos = tok.token_to_id(specials["eos_token"])
        eos = merge_ids(self.config.eos_token_ids, tok_eos, gen_eos)
        return TokenizerInfo(chat_template=template, special_tokens=specials, eos_token_ids=eos)

    def write_tokenizer(self, dest: Path) -> None:
        Path(dest).write_bytes((self.path / "tokenizer.json").read_bytes())

    # -- provenance ----------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        names = {"config.json", "tokenizer.json", *self._weight_map.values()}
        for extra in (
            "model.safetensors.index.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
            "chat_template.json",
            "special_tokens_map.json",
        ):
            if (self.path / extra).is_file():
                names.add(extra)
        return [self.path / n for n in sorted(names)]

    def close(self) -> None:
        self._handles.clear()


def open_hf_checkpoint(path: str | Path) -> HFCheckpoint:
    return HFCheckpoint(Path(path))

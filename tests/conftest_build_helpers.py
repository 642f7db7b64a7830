"""Helpers for build/engine-dir tests: tiny HF checkpoints and checkpoint surgery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_VOCAB = 49152  # the default model's tokenizer vocabulary, so its ids fit


def save_smollm_tokenizer(path: Path) -> Path:
    """The default model's tokenizer (converted from its GGUF by transformers), saved HF-style."""
    from transformers import AutoTokenizer

    from kiln.build.default_model import default_gguf_path

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return path


def make_tiny_llama(
    path: Path,
    tokenizer_dir: Path | None = None,
    *,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    generation_eos: list[int] | None = None,
    **overrides,
) -> Path:
    """A tiny random LlamaForCausalLM checkpoint at `path` (with the tokenizer files copied in)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # random norm weights, so a wrong mapping of norms would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **save_kw)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, path / f.name)
    if generation_eos is not None:
        gc = path / "generation_config.json"
        d = json.loads(gc.read_text()) if gc.is_file() else {}
        d["eos_token_id"] = generation_eos
        gc.write_text(json.dumps(d))
    return path


def hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rewrite_tensors(path: Path, edit) -> None:
    """Apply `edit(dict)` to the tensors of a single-file checkpoint `path/model.safetensors`."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst

"""Read a GGUF file (llama.cpp's format): config from metadata, tensors dequantized to float32.

Tensor names are mapped to Hugging Face names, and llama's q/k projections are un-permuted from
llama.cpp's rotary layout back to the Hugging Face one (the inverse of llama.cpp's converter,
as transformers does when it loads a GGUF).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.build.sources import SPECIAL_TOKEN_KEYS, SourceCheckpoint, TokenizerInfo, merge_ids
from kiln.config import ModelConfig
from kiln.errors import BuildError

# GGUF architecture -> (HF architecture, un-permute q/k?, qkv bias)
_ARCHS = {
    "llama": ("LlamaForCausalLM", True, False),
    "qwen2": ("Qwen2ForCausalLM", False, True),
}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None for tensors kiln does not use)."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        part = _BLOCK_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    base, _, kind = gguf_name.rpartition(".")
    top = _TOP_NAMES.get(base)
    return f"{top}.{kind}" if top and kind in ("weight", "bias") else None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> rotate-half halves)."""
    rows = w.shape[0]
    dim = rows // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFCheckpoint(SourceCheckpoint):
    kind = "gguf"

    def __init__(self, path: Path):
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError/struct errors on bad files
            raise BuildError(f"cannot read GGUF file {path}: {' '.join(str(e).split())}") from None
        arch = self._meta("general.architecture")
        if arch not in _ARCHS:
            raise BuildError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(_ARCHS))}"
            )
        self.gguf_arch = arch
        hf_arch, self._permute, qkv_bias = _ARCHS[arch]
        self._tensors: dict[str, Any] = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        if "rope_freqs.weight" in {t.name for t in self.reader.tensors}:
            raise BuildError("GGUF with rope_freqs (llama3 rope scaling) is not supported")
        config = self._config(hf_arch, qkv_bias)
        quantized = any(t.tensor_type.name not in ("F32", "F16", "BF16") for t in self._tensors.values())
        types = {t.tensor_type.name for t in self._tensors.values()}
        if quantized:
            dtype = torch.float32
        elif "BF16" in types:
            dtype = torch.bfloat16
        elif "F16" in types:
            dtype = torch.float16
        else:
            dtype = torch.float32
        self.quantized = quantized
        super().__init__(path, config, dtype)
        self._tok: Any = None

    def _meta(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v if v is not None else default

    def _config(self, hf_arch: str, qkv_bias: bool) -> ModelConfig:
        a = self.gguf_arch

        def need(key: str) -> Any:
            v = self._meta(f"{a}.{key}")
            if v is None:
                raise BuildError(f"GGUF metadata {a}.{key} is missing")
            return v

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        kv_heads = int(self._meta(f"{a}.attention.head_count_kv", heads))
        head_dim = self._meta(f"{a}.attention.key_length") or self._meta(f"{a}.rope.dimension_count")
        head_dim = int(head_dim) if head_dim else hidden // heads
        vocab = self._meta(f"{a}.vocab_size")
        if vocab is None:
            tokens = self.reader.fields.get("tokenizer.ggml.tokens")
            if tokens is not None:
                vocab = len(tokens.data)
            elif "model.embed_tokens.weight" in self._tensors:
                vocab = int(self._tensors["model.embed_tokens.weight"].shape[-1])
            else:
                raise BuildError("GGUF has no vocab size (no llama.vocab_size or tokenizer tokens)")
        rope_scaling = None
        scaling_type = self._meta(f"{a}.rope.scaling.type")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise BuildError(f"unsupported GGUF rope scaling type {scaling_type!r}")
        eos = self._meta("tokenizer.ggml.eos_token_id")
        cfg = ModelConfig(
            architecture=hf_arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(self._meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._meta(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._meta(f"{a}.context_length", 4096)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            qkv_bias=qkv_bias,
            bos_token_id=_opt_int(self._meta("tokenizer.ggml.bos_token_id")),
            eos_token_ids=() if eos is None else (int(eos),),
        )
        cfg.validate()
        return cfg

    # -- tensors -------------------------------------------------------------------------------
    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dims fastest-first: [in, out] for a linear weight.
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def get_tensor(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise BuildError(f"source is missing tensor {name}")
        shape = self.tensor_shape(name)
        if t.tensor_type == Q.F16:
            arr = np.asarray(t.data).view(np.float16)
        elif t.tensor_type == Q.BF16:
            arr = np.asarray(t.data).view(np.uint16)
        else:
            arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape(shape)
        if self._permute and name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight")):
            is_q = ".q_proj." in name
            n_head = self.config.num_heads if is_q else self.config.num_kv_heads
            arr = unpermute_rotary(arr, n_head)
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # a view into the read-only GGUF memory map
            arr = arr.copy()
        out = torch.from_numpy(arr)
        if t.tensor_type == Q.BF16:
            out = out.view(torch.bfloat16)
        return out

    # -- tokenizer -----------------------------------------------------------------------------
    def _hf_tokenizer(self) -> Any:
        if self._tok is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise BuildError(
                    "building from GGUF needs transformers to convert the tokenizer: pip install transformers"
                ) from None
            try:
                self._tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            except Exception as e:
                raise BuildError(
                    f"cannot convert the GGUF tokenizer of {self.path.name}: {' '.join(str(e).split())}"
                ) from None
        return self._tok

    def tokenizer_info(self) -> TokenizerInfo:
        tok = self._hf_tokenizer()
        specials = {k: getattr(tok, k, None) for k in SPECIAL_TOKEN_KEYS}
        specials = {k: (v if isinstance(v, str) else None) for k, v in specials.items()}
        template = getattr(tok, "chat_template", None) or self._meta("tokenizer.chat_template")
        eos = merge_ids(
            self.config.eos_token_ids,
            getattr(tok, "eos_token_id", None),
            _opt_int(self._meta("tokenizer.ggml.eot_token_id")),
        )
        return TokenizerInfo(
            chat_template=template if isinstance(template, str) else None,
            special_tokens=specials,
            eos_token_ids=eos,
        )

    def write_tokenizer(self, dest: Path) -> None:
        self._hf_tokenizer().backend_tokenizer.save(str(dest))

    def tokenizer_json(self) -> str:
        return self._hf_tokenizer().backend_tokenizer.to_str()

    def source_files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self._tok = None


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def open_gguf_checkpoint(path: str | Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(Path(path))

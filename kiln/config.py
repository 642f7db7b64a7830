"""Frozen configuration objects: the model's architecture and the engine's shape profile.

Both are written into an engine's manifest at build time and read back at load; derived values are
properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import BuildError

# Hugging Face architecture names this model definition covers, and what each adds to plain Llama.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Llama-family model, in kiln's own field names."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * self.qkv_size + self.q_size * h + 2 * h * i + i * h + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise BuildError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise BuildError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise BuildError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise BuildError(
                f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face `config.json` dict; refuse what this model definition cannot run."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise BuildError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = hf.get("head_dim") or hidden // heads
        sliding = None
        if arch == "MistralForCausalLM":
            sliding = hf.get("sliding_window")
        elif hf.get("use_sliding_window"):
            raise BuildError(f"{arch} with use_sliding_window=true is not supported")
        rope_scaling = hf.get("rope_scaling") or None
        rope_theta = hf.get("rope_theta")
        rope_params = hf.get("rope_parameters")
        if isinstance(rope_params, dict):  # transformers >= 5 spells rope settings this way
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.pop("type", "default"))
            rope_scaling.pop("rope_theta", None)
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        attention_bias = bool(hf.get("attention_bias", False))
        cfg = cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class ShapeProfile:
    """The shapes an engine is built for (TensorRT's optimization profile, in kiln's terms)."""

    max_seq_len: int = 4096
    max_batch_size: int = 64
    max_num_tokens: int = 2048
    block_size: int = 16
    # Batch sizes that decode steps are padded up to, one CUDA graph each (None: `graph_batch_sizes`
    # picks them from max_batch_size)
    cuda_graph_batch_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch_size", "max_num_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise BuildError(f"--{name.replace('_', '-')} must be at least 1")
        if self.block_size & (self.block_size - 1):
            raise BuildError(f"--block-size must be a power of two, got {self.block_size}")
        sizes = self.cuda_graph_batch_sizes
        if sizes is not None:
            sizes = tuple(sorted(set(int(b) for b in sizes)))
            if not sizes or sizes[0] < 1 or sizes[-1] > self.max_batch_size:
                raise BuildError(f"--cuda-graph-batch-sizes must lie in [1, --max-batch-size "
                                 f"{self.max_batch_size}], got {list(self.cuda_graph_batch_sizes)}")
            object.__setattr__(self, "cuda_graph_batch_sizes", sizes)

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """The decode batch buckets: the stored ones, else 1, 2, 4, 8, then every multiple of 16 up
        to max_batch_size (and max_batch_size itself). Padding wastes at most 15 rows, which cost
        almost nothing in a decode step bound by reading the weights."""
        if self.cuda_graph_batch_sizes is not None:
            return self.cuda_graph_batch_sizes
        m = self.max_batch_size
        return tuple(sorted({b for b in (1, 2, 4, 8) if b < m} | set(range(16, m, 16)) | {m}))

    @property
    def graph_prefill_tokens(self) -> tuple[int, ...]:
        """Token buckets of single-sequence prefill graphs: 16, 32, ... up to max_num_tokens,
        at most 2048 (a longer prompt is bound by its GEMMs, not by launching them)."""
        top = min(self.max_num_tokens, 2048)
        return tuple(t for t in (16, 32, 64, 128, 256, 512, 1024) if t < top) + (top,)

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.block_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["cuda_graph_batch_sizes"] is not None:
            d["cuda_graph_batch_sizes"] = list(d["cuda_graph_batch_sizes"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapeProfile":
        return cls(**d)

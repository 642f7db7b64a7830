"""Tiny random-weight checkpoints of every supported family, made with transformers (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 512

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, extra config)
FAMILIES = {
    "llama2-mha": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-gqa-rope-scaling": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        # head_dim 16 puts rotary pairs in all three llama3 bands (kept, smoothed, scaled)
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             rope_theta=500000.0,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=64))),
    "smollm2-gqa-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                         dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                              rope_theta=100000.0)),
    "llama-mqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                  dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
    "mistral-sliding-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                               dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=7,
                                    tie_word_embeddings=False)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                      dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           tie_word_embeddings=False)),
}


def word_tokenizer(vocab_size: int = VOCAB) -> Tokenizer:
    """A word-level tokenizer 'w0 w1 ...' over the tiny vocabulary (prompts are given as ids)."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_hf_dir(family: str, path: Path, seed: int = 0) -> torch.nn.Module:
    """Save a tiny random model of `family` (float32) with a tokenizer to `path`; return the model."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = cfg_cls(**{**_BASE, **extra})
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # a random init has tiny logits; widen them so greedy choices are decisive
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    word_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "w1", "eos_token": "w2", "unk_token": "w0",
         "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
    return model

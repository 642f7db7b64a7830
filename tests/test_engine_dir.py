"""Engine directory: manifest parsing and refusals, weight verification, memory-mapped loading."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest_build_helpers import copy_dir
from kiln.config import ModelConfig, ShapeProfile
from kiln.engine_dir import (
    FORMAT_VERSION,
    EngineManifest,
    load_weights,
    read_manifest,
    read_safetensors_header,
)
from kiln.errors import EngineLoadError
from kiln.weight_integrity import WeightHasher, verify_weights


@pytest.fixture
def engine(tmp_path, tiny_engine) -> Path:
    """A private copy of the tiny engine, free to damage."""
    return copy_dir(tiny_engine, tmp_path / "engine")


def edit_manifest(engine: Path, **changes) -> None:
    p = engine / "manifest.json"
    m = json.loads(p.read_text())
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(m.get(k), dict):
            m[k].update(v)
        else:
            m[k] = v
    p.write_text(json.dumps(m))


def test_read_manifest(tiny_engine):
    m = read_manifest(tiny_engine)
    assert isinstance(m, EngineManifest) and m.path == tiny_engine
    assert isinstance(m.model, ModelConfig) and m.model.num_layers == 2 and m.model.head_dim == 16
    assert m.profile == ShapeProfile(max_seq_len=256) and m.dtype == torch.float32 and m.format_version == FORMAT_VERSION
    assert m.tokenizer_path == tiny_engine / "tokenizer.json" and m.eos_token_ids == (2, 0)
    assert m.weight_paths == [tiny_engine / "weights.safetensors"]
    assert m.special_tokens["unk_token"] == "<|endoftext|>" and "<|im_start|>" in m.chat_template
    assert m.to_dict() == {k: v for k, v in json.loads((tiny_engine / "manifest.json").read_text()).items()}
    verify_weights(m)


def test_missing_directory_and_manifest(tmp_path, engine):
    with pytest.raises(EngineLoadError, match=r"^engine directory not found: .*nowhere$"):
        read_manifest(tmp_path / "nowhere")
    (engine / "manifest.json").unlink()
    with pytest.raises(EngineLoadError, match=r"not a kiln engine: .*manifest\.json is missing"):
        read_manifest(engine)


def test_missing_weight_and_tokenizer_files(tmp_path, tiny_engine):
    e1 = copy_dir(tiny_engine, tmp_path / "e1")
    (e1 / "weights.safetensors").unlink()
    with pytest.raises(EngineLoadError, match=r"engine weight file missing: .*weights\.safetensors; rebuild"):
        read_manifest(e1)
    e2 = copy_dir(tiny_engine, tmp_path / "e2")
    (e2 / "tokenizer.json").unlink()
    with pytest.raises(EngineLoadError, match=r"engine tokenizer file missing: .*tokenizer\.json"):
        read_manifest(e2)


def test_unparseable_and_unknown_format(engine):
    (engine / "manifest.json").write_text('{"format": "kiln-engine", ')
    with pytest.raises(EngineLoadError, match="cannot parse manifest"):
        read_manifest(engine)
    (engine / "manifest.json").write_text('{"format": "onnx", "format_version": 1}')
    with pytest.raises(EngineLoadError, match="unknown engine format 'onnx'"):
        read_manifest(engine)
    (engine / "manifest.json").write_text('{"format": "kiln-engine", "format_version": "one"}')
    with pytest.raises(EngineLoadError, match="unknown engine format version 'one'"):
        read_manifest(engine)


def test_newer_format_version(engine):
    edit_manifest(engine, format_version=99)
    with pytest.raises(EngineLoadError) as e:
        read_manifest(engine)
    assert str(e.value) == (
        "engine format version 99 is newer than this kiln supports (1); rebuild the engine or upgrade kiln")


def test_unsupported_architecture_and_malformed(tmp_path, tiny_engine):
    e1 = copy_dir(tiny_engine, tmp_path / "e1")
    edit_manifest(e1, model={"architecture": "GPT2LMHeadModel"})
    with pytest.raises(EngineLoadError, match="unsupported architecture 'GPT2LMHeadModel'; supported: Llama"):
        read_manifest(e1)
    e2 = copy_dir(tiny_engine, tmp_path / "e2")
    edit_manifest(e2, dtype="int4")
    with pytest.raises(EngineLoadError, match="unsupported engine dtype 'int4'"):
        read_manifest(e2)
    e3 = copy_dir(tiny_engine, tmp_path / "e3")
    m = json.loads((e3 / "manifest.json").read_text())
    del m["profile"]
    (e3 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineLoadError, match=r"malformed manifest \('profile'\)"):
        read_manifest(e3)


def test_flipped_byte_caught(engine):
    m = read_manifest(engine)
    w = engine / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    expected = m.weights[0]["sha256"]
    with pytest.raises(EngineLoadError) as e:
        verify_weights(m)
    msg = str(e.value)
    assert msg.startswith(f"weights.safetensors: sha256 mismatch in part 0 (bytes 0..; expected {expected[:12]}…, got ")
    assert msg.endswith("); the engine is corrupt, rebuild it") and "\n" not in msg
    w.write_bytes(bytes(data[:-4]))
    with pytest.raises(EngineLoadError, match="size mismatch"):
        verify_weights(m)


def test_weights_checked_in_parallel_parts(engine):
    """sha256_parts: each part is hashed on its own thread; a flipped byte names its part, and an
    engine whose manifest predates the parts is checked against the whole-file hash."""
    w = engine / "weights.safetensors"
    data = w.read_bytes()
    part = 4096
    hasher = WeightHasher(part)
    hasher.update(data)
    entry = hasher.manifest_entry("weights.safetensors", len(data))
    assert len(entry["sha256_parts"]["digests"]) == -(-len(data) // part) >= 3
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["sha256_parts"]["digests"][1] == hashlib.sha256(data[part:2 * part]).hexdigest()
    edit_manifest(engine, weights=[entry])
    verify_weights(read_manifest(engine), use_cache=False)
    bad = bytearray(data)
    bad[2 * part + 7] ^= 0x80
    w.write_bytes(bytes(bad))
    with pytest.raises(EngineLoadError, match=r"sha256 mismatch in part 2 \(bytes 8192\.\."):
        verify_weights(read_manifest(engine), use_cache=False)
    legacy = {k: v for k, v in entry.items() if k != "sha256_parts"}
    edit_manifest(engine, weights=[legacy])
    with pytest.raises(EngineLoadError, match=r"sha256 mismatch \(expected"):
        verify_weights(read_manifest(engine), use_cache=False)
    w.write_bytes(data)
    verify_weights(read_manifest(engine), use_cache=False)
    edit_manifest(engine, weights=[{**entry, "sha256_parts": {"part_bytes": part, "digests": ["x"]}}])
    with pytest.raises(EngineLoadError, match="do not cover"):
        verify_weights(read_manifest(engine), use_cache=False)


def test_load_weights_is_a_memory_map(tiny_engine):
    m = read_manifest(tiny_engine)
    w = tiny_engine / "weights.safetensors"
    ref = load_file(str(w))
    a = load_weights(m)
    assert set(a) == set(ref)
    for k in ref:
        assert a[k].dtype == ref[k].dtype and torch.equal(a[k], ref[k]), k
    storages = {t.untyped_storage().data_ptr() for t in a.values()}
    assert len(storages) == 1  # every tensor is a view into one storage ...
    storage = next(iter(a.values())).untyped_storage()
    assert storage.nbytes() == w.stat().st_size  # ... that maps the whole file, header included
    data_start, header = read_safetensors_header(w)
    base = storage.data_ptr()
    for k, t in a.items():
        assert t.data_ptr() - base == data_start + header[k]["data_offsets"][0], k
    head = bytes(storage[:8].tolist())
    assert struct.unpack("<Q", head)[0] == data_start - 8
    # private mapping: writing to a loaded tensor changes neither the file nor another load
    before = w.read_bytes()
    a["norm.weight"].add_(1.0)
    assert w.read_bytes() == before
    assert torch.equal(load_weights(m)["norm.weight"], ref["norm.weight"])


def test_load_weights_misaligned_falls_back_to_copy(engine):
    """A file whose header length leaves the data section misaligned still loads, by copying."""
    w = engine / "weights.safetensors"
    ref = {k: v.clone() for k, v in load_file(str(w)).items()}  # load_file may map the file too
    data_start, header = read_safetensors_header(w)
    raw = w.read_bytes()
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * ((1 - (8 + len(js))) % 8)  # data section starts at 1 mod 8
    assert (8 + len(js)) % 4 != 0
    w.write_bytes(struct.pack("<Q", len(js)) + js + raw[data_start:])
    assert torch.equal(load_file(str(w))["norm.weight"], ref["norm.weight"])  # still a valid file
    got = load_weights(read_manifest(engine))
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_load_weights_checks_layout(engine):
    from safetensors.torch import save_file

    w = engine / "weights.safetensors"
    tensors = load_file(str(w))
    tensors.pop("layers.1.mlp.down_proj.weight")
    save_file(tensors, str(w))
    with pytest.raises(EngineLoadError, match=r"engine is missing tensor layers\.1\.mlp\.down_proj\.weight"):
        load_weights(read_manifest(engine))
    tensors["layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(w))
    with pytest.raises(EngineLoadError, match=r"down_proj\.weight has shape \(3, 3\), expected \(64, 128\)"):
        load_weights(read_manifest(engine))


def test_default_engine_loads(default_engine):
    m = read_manifest(default_engine)
    w = load_weights(m)
    assert w["embed_tokens.weight"].shape == (49152, 576) and "lm_head.weight" not in w
    assert w["layers.0.attn.qkv_proj.weight"].shape == (576 + 2 * 192, 576)


def test_verification_is_remembered_until_the_file_changes(tiny_engine, tmp_path, monkeypatch):
    import kiln.weight_integrity as wi

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    w = engine / "weights.safetensors"
    os.utime(w, (1_700_000_000, 1_700_000_000))  # settled: written long ago
    m = read_manifest(engine)
    hashed = []
    real = wi.sha256_file
    monkeypatch.setattr(wi, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    verify_weights(m)
    verify_weights(m)
    assert len(hashed) == 1  # the second load trusted the record
    verify_weights(m, use_cache=False)
    assert len(hashed) == 2
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))  # same size; the rewrite changes the modification time
    with pytest.raises(EngineLoadError, match="sha256 mismatch"):
        verify_weights(m)

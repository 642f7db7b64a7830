"""`kiln build --dummy ARCH`: real architectures' shapes, seeded random weights, a folded tokenizer."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from kiln.build.builder import build_engine
from kiln.build.dummy import DummySource, shrink_tokenizer_json
from kiln.build.dummy_configs import ARCHITECTURES
from kiln.config import ModelConfig
from kiln.engine_dir import read_manifest
from kiln.model.layout import runtime_layout

# Published parameter counts (the models' cards and papers), an independent check of the configs.
PUBLISHED_PARAMS = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_configs_have_the_published_sizes(name):
    cfg = ModelConfig.from_hf(ARCHITECTURES[name])
    assert sum(math.prod(s.shape) for s in runtime_layout(cfg)) == PUBLISHED_PARAMS[name]


def test_small_llama2_shaped_dummy_builds_loads_and_generates(tmp_path):
    from kiln import LLM, SamplingParams

    src = DummySource("llama-2-7b", **SMALL)
    try:
        a = build_engine(src, tmp_path / "a", dtype="float32", progress=False)
        b = build_engine(src, tmp_path / "b", dtype="float32", progress=False)
    finally:
        src.close()
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma.dummy and ma.source["kind"] == "dummy" and ma.source["dummy_of"] == "llama-2-7b"
    assert ma.weights[0]["sha256"] == mb.weights[0]["sha256"]  # seeded: the same bytes twice
    assert ma.model.vocab_size == 32000 and all(i < 32000 for i in ma.eos_token_ids)
    llm = LLM(a, device="cpu", skip_verify=True, kv_cache_memory=16 << 20)
    ids = llm.encode_prompt("Hello world, this is a dummy engine with a folded vocabulary: \u00e9\u00e8")
    assert ids and max(ids) < 32000
    out = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 8 and max(out.token_ids) < 32000


def test_shrunk_tokenizer_stays_in_range_and_round_trips():
    from tokenizers import Tokenizer

    from kiln.build.default_model import default_gguf_path
    from kiln.build.gguf_reader import GGUFCheckpoint

    src = GGUFCheckpoint(default_gguf_path())
    try:
        text = src._hf_tokenizer().backend_tokenizer.to_str()
    finally:
        src.close()
    original = Tokenizer.from_str(text)
    small = Tokenizer.from_str(shrink_tokenizer_json(text, 1000))
    sample = "The quick brown fox jumps over the lazy dog, naïvely: 3.14 <|im_start|>user\nhi<|im_end|> 日本"
    ids = small.encode(sample).ids
    assert max(ids) < 1000 and len(ids) > len(original.encode(sample).ids)
    assert small.decode(ids, skip_special_tokens=False) == original.decode(original.encode(sample).ids,
                                                                            skip_special_tokens=False)
    raw = json.loads(shrink_tokenizer_json(text, 1000))
    assert max(raw["model"]["vocab"].values()) < 1000 and all(t["id"] < 1000 for t in raw["added_tokens"])


def test_cli_refuses_unknown_arch_and_serve_refuses_a_dummy(tmp_path, default_engine):
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "build", "--dummy", "gpt-5", "-o",
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "build", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "either SOURCE or --dummy" in r.stderr
    src = DummySource("qwen2.5-7b", tokenizer_from=default_engine, **SMALL)  # a vocabulary > 49152: kept
    try:
        engine = build_engine(src, tmp_path / "q", dtype="float32", progress=False)
    finally:
        src.close()
    assert (engine / "tokenizer.json").read_text() == (default_engine / "tokenizer.json").read_text()
    assert read_manifest(engine).chat_template == read_manifest(default_engine).chat_template
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "serve", str(engine), "--port", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "dummy engine" in r.stderr and "--allow-dummy" in r.stderr

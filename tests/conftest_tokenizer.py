"""Shared fixtures: the default model's tokenizer, via transformers and via kiln.Tokenizer.

Import the fixtures into a test module (`from conftest_tokenizer import hf_tokenizer,
default_tokenizer`). Built once per session (converting the GGUF vocab takes seconds).
"""

from __future__ import annotations

import functools
import os
import tempfile

import pytest

from kiln.build.default_model import default_gguf_path  # the model is part of setup: missing = failure


@functools.lru_cache(maxsize=1)
def _build():
    from transformers import AutoTokenizer

    from kiln.tokenizer import Tokenizer

    path = str(default_gguf_path())
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

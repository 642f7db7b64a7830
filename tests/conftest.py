"""Session fixtures shared across the test suite.

`default_engine`: a built engine of the default model (SmolLM2-135M-Instruct GGUF), reused from
the kiln cache (`$KILN_CACHE_DIR` or `~/.cache/kiln`) when a valid one is there, built once
otherwise. `tiny_hf_dir` / `tiny_hf_sharded_dir`: the same tiny random Llama checkpoint, saved
whole and sharded, with the default model's tokenizer. Treat all of them as read-only: copy a
directory before changing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. This must be set before anything imports
# triton (transformers does, when a test module imports it), so here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest_build_helpers import make_tiny_llama, save_smollm_tokenizer


@pytest.fixture(scope="session")
def default_engine() -> Path:
    from kiln.build.default_model import ensure_default_engine

    return ensure_default_engine(progress=False)


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    return save_smollm_tokenizer(tmp_path_factory.mktemp("smollm-tokenizer"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny-hf") / "ckpt", smollm_tokenizer_dir, generation_eos=[2, 0]
    )


@pytest.fixture(scope="session")
def tiny_hf_sharded_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny-hf-sharded") / "ckpt",
        smollm_tokenizer_dir,
        generation_eos=[2, 0],
        max_shard_size="50KB",
    )


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory, tiny_hf_dir) -> Path:
    from kiln.build.builder import build_engine

    return build_engine(tiny_hf_dir, tmp_path_factory.mktemp("tiny-engine") / "engine", progress=False)


@pytest.fixture(scope="session")
def server(default_engine):
    """One `kiln serve` process of the default model, with an API key, shared by the HTTP tests
    that leave it as they found it. At the end it must drain on SIGTERM, exit 0, leave no child."""
    from serve_helpers import API_KEY, serving

    with serving(default_engine, api_key=API_KEY) as srv:
        yield srv

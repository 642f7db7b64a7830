"""Real weights: greedy output on the default model is token-identical to transformers on the same GGUF."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.build.default_model import default_gguf_path
from kiln.llm import LLM
from kiln.sampling_params import SamplingParams

N_NEW = 48
PLAIN = [
    "The capital of France is",
    "Der schnellste Weg, Deutsch zu lernen, ist",  # non-English prompt
    "中国的首都是",  # non-English, multi-byte prompt
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write the word 'café' three times, then a smiley emoji."}],
]


@pytest.fixture(scope="module")
def hf():
    path = default_gguf_path()
    kw = dict(gguf_file=path.name)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    return tok, model.eval()


@pytest.fixture(scope="module")
def llm(default_engine):
    return LLM(default_engine, device="cpu")


def hf_greedy(tok, model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers(hf, llm):
    tok, model = hf
    prompts = [tok(p).input_ids for p in PLAIN]
    prompts += [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
                for c in CHATS]
    mine = llm.generate(PLAIN, SamplingParams(max_tokens=N_NEW, temperature=0.0))
    mine += llm.chat(CHATS, SamplingParams(max_tokens=N_NEW, temperature=0.0))
    assert [m.prompt_token_ids for m in mine] == prompts, "tokenization differs from transformers"
    texts = []
    for m, ids in zip(mine, prompts):
        out = m.outputs[0]
        assert out.token_ids == hf_greedy(tok, model, ids), f"prompt {m.prompt!r}"
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
        texts.append(out.text)
    assert "Paris" in texts[3]
    assert any(ord(ch) > 127 for t in texts for ch in t), "no multi-byte character in any output"

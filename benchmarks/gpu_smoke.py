"""GPU smoke run of the engine core: host syncs per step, and a first speed reading.

On a CUDA machine, with a random-weight model of SmolLM2-135M's shape (made with transformers,
saved as a HF directory, built with `kiln build`):
  1. counts the host synchronizations of one decode step (torch's sync debug mode): the only one
     allowed is the sampler's copy of the sampled token ids to the host;
  2. times batch-1 greedy decode of N tokens with kiln and with transformers' eager `generate` on the
     same weights, and kiln at batch 32;
Results are printed as JSON (and written to --json).

Usage: python benchmarks/gpu_smoke.py [--dtype bfloat16] [--tokens 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import word_tokenizer  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)


def make_model(path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).to(dtype)
    model.save_pretrained(path)
    word_tokenizer(SMOLLM2_135M["vocab_size"]).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "w1", "eos_token": "w2", "unk_token": "w0",
         "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))


def count_syncs(llm, prompt: list[int]) -> dict:
    from kiln import SamplingParams

    llm.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    llm.core.step()  # prefill
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.core.step()  # one decode step
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for _ in llm.stream():
        pass
    msgs = [str(w.message).splitlines()[0] for w in caught]
    return {"syncs_in_one_decode_step": len(msgs), "messages": msgs}


def kiln_decode(llm, prompts: list[list[int]], tokens: int) -> dict:
    from kiln import SamplingParams

    p = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, p)
    dt = time.perf_counter() - t0
    firsts = [o.outputs[0].metrics for o in outs]
    decode = max(m.finished_time for m in firsts) - max(m.first_token_time for m in firsts)
    return {"batch": len(prompts), "output_tok_s": len(prompts) * tokens / dt,
            "decode_ms_per_step": decode / (tokens - 1) * 1000,
            "ttft_ms": min(m.ttft for m in firsts) * 1000}


def hf_decode(path: Path, dtype: torch.dtype, prompt: list[int], tokens: int) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return {"batch": 1, "output_tok_s": tokens / dt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    from kiln import LLM
    from kiln.build.builder import build_engine

    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "dtype": args.dtype, "shape": "SmolLM2-135M"}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        make_model(hf_dir, dtype)
        t0 = time.perf_counter()
        engine = build_engine(str(hf_dir), Path(tmp) / "engine", dtype=args.dtype, progress=False)
        res["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm = LLM(engine, device="cuda", kv_cache_memory=4 << 30)
        res["load_s"] = time.perf_counter() - t0
        prompt = list(range(100, 132))
        res["sync"] = count_syncs(llm, prompt)
        res["kiln_b1"] = kiln_decode(llm, [prompt], args.tokens)
        res["kiln_b32"] = kiln_decode(llm, [[100 + i] + prompt[1:] for i in range(32)], args.tokens)
        del llm
        torch.cuda.empty_cache()
        res["transformers_b1"] = hf_decode(hf_dir, dtype, prompt, args.tokens)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""kiln vs transformers on the embedded default model, same machine, same run.

Measures, for batch 1, greedy, one prompt, exactly N new tokens (EOS ignored on both sides):
  - `kiln generate default ...` (the CLI, in a subprocess): its own speed line;
  - kiln's offline API in this process: tokens/s over the whole request and decode-only;
  - transformers' `generate` on the same GGUF (what DESIGN.md calls the eager reference);
and the time to ready:
  - `LLM(engine_dir)` (with and without sha256 verification), in a fresh process, after imports;
  - transformers' `from_pretrained(..., gguf_file=...)` of the same GGUF, in a fresh process, after imports.

Usage: .venv/bin/python benchmarks/cpu_default.py [--tokens 128] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The history of the printing press begins"

_KILN_LOAD = """
import time, sys
import torch, kiln.llm
t0 = time.perf_counter()
llm = kiln.llm.LLM(sys.argv[1], device="cpu", skip_verify=sys.argv[2] == "1")
print(time.perf_counter() - t0)
"""

_HF_LOAD = """
import time, sys
from pathlib import Path
import torch, transformers
from kiln.build.default_model import default_gguf_path
p = default_gguf_path()
t0 = time.perf_counter()
tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
model.eval()
print(time.perf_counter() - t0)
"""


def _fresh_process_seconds(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def kiln_cli(tokens: int) -> dict:
    cmd = ["kiln", "generate", "default", "--prompt", PROMPT, "--max-tokens", str(tokens),
           "--ignore-eos", "--device", "cpu"]
    exe = Path(sys.executable).with_name("kiln")
    out = subprocess.run([str(exe), *cmd[1:]], check=True, capture_output=True, text=True)
    line = out.stderr.strip().splitlines()[-1]
    m = re.search(r"(\d+) generated in ([\d.]+) s: ([\d.]+) tok/s; first token (\d+) ms; decode ([\d.]+)", line)
    assert m, line
    return {"command": shlex.join(cmd), "generated": int(m[1]), "seconds": float(m[2]),
            "tok_s": float(m[3]), "ttft_ms": float(m[4]), "decode_tok_s": float(m[5])}


def kiln_api(tokens: int, repeats: int) -> tuple[dict, list[int]]:
    from kiln import LLM, SamplingParams

    llm = LLM("default", device="cpu")
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    runs, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate(PROMPT, params)[0].outputs[0]
        dt = time.perf_counter() - t0
        assert len(out.token_ids) == tokens
        runs.append(tokens / dt)
        first = out.metrics.first_token_time - out.metrics.arrival_time
        decode.append((tokens - 1) / (out.metrics.finished_time - out.metrics.first_token_time))
    return ({"tok_s": statistics.median(runs), "decode_tok_s": statistics.median(decode),
             "ttft_ms_last": first * 1000, "runs_tok_s": runs}, out.token_ids)


def hf_generate(tokens: int, repeats: int) -> tuple[dict, list[int]]:
    import torch
    import transformers

    from kiln.build.default_model import default_gguf_path

    p = default_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name,
                                                              dtype=torch.float32).eval()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    kw = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=None,
              pad_token_id=tok.eos_token_id or 0)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            dt = time.perf_counter() - t0
            assert out.shape[1] - ids.shape[1] == tokens
            runs.append(tokens / dt)
    return {"tok_s": statistics.median(runs), "runs_tok_s": runs}, out[0, ids.shape[1]:].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    import transformers

    from kiln.build.default_model import ensure_default_engine
    from kiln.version import __version__

    engine = ensure_default_engine(progress=False)
    res: dict = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers_version": transformers.__version__, "kiln": __version__, "torch_threads": torch.get_num_threads(),
        "prompt": PROMPT, "new_tokens": args.tokens,
    }
    res["kiln_cli"] = kiln_cli(args.tokens)
    res["kiln_api"], kiln_ids = kiln_api(args.tokens, args.repeats)
    res["transformers"], hf_ids = hf_generate(args.tokens, args.repeats)
    same = next((i for i, (a, b) in enumerate(zip(kiln_ids, hf_ids)) if a != b), None)
    res["greedy_tokens_identical"] = same is None
    res["first_divergence"] = same
    res["load_s"] = {
        "kiln_LLM_verify": min(_fresh_process_seconds(_KILN_LOAD, str(engine), "0") for _ in range(args.repeats)),
        "kiln_LLM_skip_verify": min(_fresh_process_seconds(_KILN_LOAD, str(engine), "1")
                                    for _ in range(args.repeats)),
        "transformers_gguf": min(_fresh_process_seconds(_HF_LOAD) for _ in range(args.repeats)),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

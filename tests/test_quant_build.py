"""Quantized engines end to end: SmoothQuant's folds leave the float model unchanged; each recipe's
engine computes what transformers computes with the same dequantized weights and quantized
activations; the build's options, errors and manifest; `kiln eval ppl`."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kiln.build.builder import build_engine
from kiln.cli.main import main
from kiln.engine.core import EngineCore, EngineOptions
from kiln.engine_dir import load_weights, read_manifest
from kiln.errors import BuildError, EngineLoadError
from kiln.quant.build import QuantOptions
from kiln.quant.calibrate import CALIBRATION_NAME
from kiln.quant.fp8 import fp8_codes, quantize_rows_fp8
from kiln.quant.int8 import quantize_rows
from kiln.quant.perplexity import perplexity, window_forward
from kiln.quant.smooth import smooth_layer
from tiny_models import VOCAB, make_hf_dir

SHAPE = dict(dtype="float32", max_seq_len=128, max_batch_size=4, max_num_tokens=256, block_size=8,
             progress=False)


def word_text(path, n_words, seed):
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n_words)))
    return str(path)


def tiny_quant(tmp_path, recipe, **kw):
    return QuantOptions(recipe=recipe, calib_data=word_text(tmp_path / "calib.txt", 400, 1), calib_samples=6,
                        calib_seq_len=48, accuracy_gate=False, **kw)


def core_of(engine):
    return EngineCore(engine, EngineOptions(device="cpu", kv_cache_memory=4 << 20))


@pytest.mark.parametrize("family", ["qwen2-qkv-bias", "llama2-mha", "qwen3-qk-norm"])
def test_smoothquant_folds_leave_the_float_model_unchanged(tmp_path, family):
    make_hf_dir(family, tmp_path / "hf")
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "e", **SHAPE)
    core = core_of(engine)
    cfg = core.manifest.model
    tokens = [random.Random(2).randrange(3, VOCAB) for _ in range(40)]
    with window_forward(core, tokens) as h:
        before = h.clone()
    g = torch.Generator().manual_seed(3)
    stats = {}  # made-up calibration maxima, with outlier channels
    for name, mod in core.runner.model.named_modules():
        if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
            a = torch.rand(mod.in_features, generator=g) + 0.1
            a[:3] *= 50.0
            stats[name] = a
    state = dict(core.runner.model.state_dict())
    for i in range(cfg.num_layers):
        new = smooth_layer(state, cfg, i, stats, alpha=0.6)
        for k in ("input_norm.weight", "post_attn_norm.weight", "attn.o_proj.weight", "mlp.down_proj.weight"):
            assert not torch.allclose(new[f"layers.{i}.{k}"], state[f"layers.{i}.{k}"], rtol=1e-2), k
        state.update(new)
    core.runner.model.load_state_dict(state, assign=True)
    with window_forward(core, tokens) as h:
        torch.testing.assert_close(h, before, rtol=2e-4, atol=2e-4)


def sylvester(n):
    """Normalized Hadamard matrix of order n, by Kronecker products (independent of kiln.quant.rotate)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / n ** 0.5


def hf_reference_ppl(hf_model, engine, windows, hidden: list | None = None):
    """transformers' perplexity with the engine's dequantized weights (and smoothed norms), its
    activations quantized at every quantized linear's input as the recipe says; with the recipe's
    rotations, down_proj's input is rotated before it is quantized (the other rotation is in the
    weights: v rows and o_proj columns). `hidden`: a list that receives the final hidden states
    [len, hidden] of the first window."""
    m = read_manifest(engine)
    scheme, cfg = m.quant_scheme, m.model
    rot = scheme.rotate if scheme else 0
    hmat = sylvester(rot) if rot else None
    t = load_weights(m)
    sd = hf_model.state_dict()

    def deq(prefix):
        return t[prefix + ".qweight"].float() * t[prefix + ".wscale"][:, None]

    hooks = []
    for i, layer in enumerate(hf_model.model.layers if scheme else []):  # none: float weights as they are
        p = f"layers.{i}."
        qkv = deq(p + "attn.qkv_proj")
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        gate, up = deq(p + "mlp.gate_up_proj").chunk(2)
        new = {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
               "self_attn.o_proj.weight": deq(p + "attn.o_proj"), "mlp.gate_proj.weight": gate,
               "mlp.up_proj.weight": up, "mlp.down_proj.weight": deq(p + "mlp.down_proj"),
               "input_layernorm.weight": t[p + "input_norm.weight"],
               "post_attention_layernorm.weight": t[p + "post_attn_norm.weight"]}
        if cfg.qkv_bias:
            qb, kb, vb = t[p + "attn.qkv_proj.bias"].split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            new.update({"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb})
        for name, val in new.items():
            sd[f"model.layers.{i}.{name}"] = val
        for lin, src in (("self_attn.q_proj", "attn.qkv_proj"), ("self_attn.k_proj", "attn.qkv_proj"),
                         ("self_attn.v_proj", "attn.qkv_proj"), ("self_attn.o_proj", "attn.o_proj"),
                         ("mlp.gate_proj", "mlp.gate_up_proj"), ("mlp.up_proj", "mlp.gate_up_proj"),
                         ("mlp.down_proj", "mlp.down_proj")):
            act_scale = t.get(p + src + ".act_scale")

            def fake_quant(_mod, args, act_scale=act_scale, rotate=rot and src == "mlp.down_proj"):
                x = args[0]
                x2 = x.reshape(-1, x.shape[-1])
                if rotate:
                    x2 = x2 @ torch.block_diag(*[hmat] * (x2.shape[-1] // rot))
                if scheme.act_quant == "int8":
                    qx, s = quantize_rows(x2)
                    x2 = qx.float() * s[:, None]
                elif scheme.act_quant == "fp8" and act_scale is not None:
                    x2 = fp8_codes(x2, act_scale).float() * act_scale
                elif scheme.act_quant == "fp8":
                    qx, s = quantize_rows_fp8(x2)
                    x2 = qx.float() * s[:, None]
                return (x2.reshape(x.shape).to(x.dtype),)

            hooks.append(hf_model.get_submodule(f"model.layers.{i}.{lin}").register_forward_pre_hook(fake_quant))
    hf_model.load_state_dict(sd)
    kv = m.quant.get("kv_cache")
    if kv:  # keys (after rotary embedding) and values as the fp8 cache holds them
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        def fp8_kv_attention(module, query, key, value, *args, **kw):
            i = module.layer_idx
            fq = lambda x, s: (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float().mul(s).to(x.dtype)  # noqa: E731
            return sdpa_attention_forward(module, query, fq(key, kv["k_scale"][i]), fq(value, kv["v_scale"][i]),
                                          *args, **kw)

        AttentionInterface.register("test_fp8_kv", fp8_kv_attention)
        hf_model.set_attn_implementation("test_fp8_kv")
    nll = n = 0.0
    try:
        with torch.no_grad():
            if hidden is not None:
                hidden.append(hf_model.model(torch.tensor([windows[0]])).last_hidden_state[0])
            for w in windows:
                nll += hf_model(torch.tensor([w]), labels=torch.tensor([w])).loss.item() * (len(w) - 1)
                n += len(w) - 1
    finally:
        for h in hooks:
            h.remove()
        if kv:
            hf_model.set_attn_implementation("sdpa")
    return float(torch.tensor(nll / n).exp())


# Hadamard blocks (int8-sq only): the largest power of two <= 64 dividing intermediate_size (96 here)
# and head_dim: 16 for head_dim 16, none for smollm2's head_dim 8 (under 16); none for other recipes.
@pytest.mark.parametrize("family,recipe,acts,block", [
    ("smollm2-gqa-tied", "int8-weight", "dynamic", 0), ("qwen2-qkv-bias", "int8-sq", "dynamic", 16),
    ("llama2-mha", "int8-sq", "no-rotation", 0), ("smollm2-gqa-tied", "int8-sq", "auto-alpha", 0),
    ("llama2-mha", "fp8", "dynamic", 0), ("qwen3-qk-norm", "fp8", "static", 0),
    ("qwen2-qkv-bias", "none", "fp8-kv", 0), ("llama2-mha", "int8-sq", "fp8-kv", 16)])
def test_quantized_engine_matches_transformers_with_the_same_quantization(tmp_path, family, recipe, acts, block):
    hf = make_hf_dir(family, tmp_path / "hf")
    kw = {"auto-alpha": dict(smoothquant_alpha="auto"), "no-rotation": dict(rotation=False),
          "fp8-kv": dict(kv_cache="fp8")}.get(acts, dict(fp8_activations=acts))
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "e", **SHAPE, quant=tiny_quant(tmp_path, recipe, **kw))
    m = read_manifest(engine)
    assert (m.quant_scheme.rotate if m.quant_scheme else 0) == block
    assert m.quant.get("rotation", {}).get("block", 0) == block
    if acts == "fp8-kv":  # one (k, v) scale pair per layer, from calibration; the pool holds fp8 codes
        spec = m.kv_cache_spec
        assert len(spec.k_scales) == m.model.num_layers and min(spec.k_scales + spec.v_scales) > 0
        assert core_of(engine).runner.kv_caches.dtype == torch.float8_e4m3fn
    if family == "smollm2-gqa-tied" and recipe == "int8-sq":
        assert "head_dim 8" in m.quant["rotation"]["not_applied"]
    assert m.quant["recipe"] == recipe and m.quant["accuracy_gate"] == {"enabled": False,
                                                                          "reason": "--no-accuracy-gate"}
    assert (engine / CALIBRATION_NAME).exists() == (recipe == "int8-sq" or acts in ("static", "fp8-kv"))
    if acts == "auto-alpha":  # one alpha per linear layer, from the grid, recorded
        alphas = m.quant["smoothquant"]["alphas"]
        assert len(alphas) == 4 * m.model.num_layers and set(alphas.values()) <= {0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
    rng = random.Random(4)
    windows = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (40, 33)]
    core = core_of(engine)
    got = perplexity(core, windows)["ppl"]
    hidden = []
    assert got == pytest.approx(hf_reference_ppl(hf, engine, windows, hidden), rel=1e-3)
    if recipe == "none":  # float weights, fp8 KV: no activation codes to flip, so compare hidden states
        with window_forward(core, windows[0]) as h:
            torch.testing.assert_close(h, hidden[0], rtol=1e-4, atol=1e-4)


def test_quantized_weights_are_smaller_and_typed(tmp_path):
    make_hf_dir("llama2-mha", tmp_path / "hf")
    fp = build_engine(str(tmp_path / "hf"), tmp_path / "fp", **SHAPE)
    q = build_engine(str(tmp_path / "hf"), tmp_path / "q", **SHAPE, quant=tiny_quant(tmp_path, "fp8"))
    t = load_weights(read_manifest(q))
    assert t["layers.0.attn.qkv_proj.qweight"].dtype == torch.float8_e4m3fn
    assert t["layers.0.attn.qkv_proj.wscale"].dtype == torch.float32
    assert "layers.0.attn.qkv_proj.weight" not in t and t["embed_tokens.weight"].dtype == torch.float32
    lin = sum(v.numel() for k, v in t.items() if k.endswith(".qweight"))
    size = lambda e: (e / "weights.safetensors").stat().st_size  # noqa: E731
    scales = sum(v.numel() for k, v in t.items() if k.endswith(".wscale"))
    # 4 bytes -> 1 byte per quantized weight, plus a float32 scale per output row (and a longer header)
    assert abs(size(q) - (size(fp) - 3 * lin + 4 * scales)) < 2048


def test_option_and_data_errors_are_one_line_and_leave_nothing(tmp_path):
    make_hf_dir("llama2-mha", tmp_path / "hf")
    out = tmp_path / "e"
    calib = word_text(tmp_path / "c.txt", 300, 5)
    (tmp_path / "bad.jsonl").write_text('{"text": "w3 w4"}\n{"body": 1}\n')
    cases = [
        (QuantOptions(recipe="int8-sq", calib_data=str(tmp_path / "missing.txt")), "cannot read calibration data"),
        (QuantOptions(recipe="int8-sq", calib_data=str(tmp_path / "bad.jsonl")), "bad.jsonl:2"),
        (QuantOptions(recipe="int8-sq", smoothquant_alpha=1.5), "--smoothquant-alpha"),
        (QuantOptions(recipe="int4"), "unknown --quant"),
        (QuantOptions(recipe="int8-sq", calib_data=calib, calib_seq_len=48, calib_samples=2,
                      eval_data=calib, eval_seq_len=48), "share 1 text"),
        (QuantOptions(recipe="int8-weight", eval_data=calib, eval_seq_len=4096), "--eval-seq-len 4096 exceeds"),
    ]
    for opts, msg in cases:
        with pytest.raises(BuildError, match=msg) as e:
            build_engine(str(tmp_path / "hf"), out, **SHAPE, quant=opts)
        assert "\n" not in str(e.value)
        assert not out.exists() and not list(tmp_path.glob(".e.building-*"))


def test_unknown_recipe_in_a_manifest_is_refused(tmp_path):
    make_hf_dir("llama2-mha", tmp_path / "hf")
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "e", **SHAPE)
    m = json.loads((engine / "manifest.json").read_text())
    m["quant"] = {"recipe": "int3"}
    (engine / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineLoadError, match="unknown quantization recipe 'int3'"):
        read_manifest(engine)


GATE = ["--calib-samples", "8", "--calib-seq-len", "256", "--eval-tokens", "2048", "--no-progress"]


# Both pass the default 1% gate: int8-weight (+0.13% on the full held-out part, BENCHMARKS.md) and
# int8-sq with its Hadamard rotations (+0.75%; without them +1.11%).
@pytest.mark.parametrize("recipe,limit", [("int8-weight", 1.0), ("int8-sq", 1.0)])
def test_default_model_passes_the_gate(tmp_path, recipe, limit, capsys):
    out = tmp_path / recipe
    assert main(["build", "default", "-o", str(out), "--quant", recipe, *GATE]) == 0
    gate = read_manifest(out).quant["accuracy_gate"]
    assert gate["enabled"] and gate["passed"] and gate["max_increase_pct"] == limit and gate["tokens"] == 2044
    assert 5 < gate["ppl_reference"] < 50 and -1.0 <= gate["increase_pct"] <= limit
    assert gate["increase_pct"] == pytest.approx((gate["ppl_quantized"] / gate["ppl_reference"] - 1) * 100, abs=1e-3)
    assert "gate passed" in capsys.readouterr().err
    # kiln eval ppl scores the same windows the same way
    capsys.readouterr()
    assert main(["eval", "ppl", str(out), "--max-tokens", "2048", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 2044 and r["ppl"] == pytest.approx(gate["ppl_quantized"], rel=1e-5)
    core = EngineCore(out, EngineOptions(device="cpu"))
    assert core.manifest.quant_scheme.recipe == recipe
    if recipe == "int8-sq":
        stats = (out / CALIBRATION_NAME)
        assert stats.exists()
        from safetensors.torch import load_file

        s = load_file(str(stats))
        assert len(s) == 4 * core.manifest.model.num_layers + 1 and all((v >= 0).all() for v in s.values())
        assert s["kv_cache.absmax"].shape == (core.manifest.model.num_layers, 2)
        assert core.manifest.quant["rotation"]["block"] == 64 and core.manifest.quant_scheme.rotate == 64


def test_default_model_gate_failure_writes_nothing(tmp_path, capsys):
    out = tmp_path / "strict"
    assert main(["build", "default", "-o", str(out), "--quant", "fp8", "--max-ppl-increase", "0.0001",
                 *GATE]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kiln: error")]
    assert len(err) == 1 and "accuracy gate failed" in err[0], err
    nums = [float(x) for x in __import__("re").findall(r"perplexity ([\d.]+) unquantized -> ([\d.]+)", err[0])[0]]
    assert nums[1] > nums[0] * 1.000001 and "0.0001%" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".strict*"))


def test_serve_shows_the_recipe_and_gate(tmp_path):
    """A real `kiln serve` of a quantized engine: /v1/models carries the recipe and the gate result,
    the ready log line names them, and the openai client gets a completion."""
    import httpx
    import openai
    from serve_helpers import serving

    make_hf_dir("qwen2-qkv-bias", tmp_path / "hf")
    opts = QuantOptions(recipe="int8-weight", eval_data=word_text(tmp_path / "held.txt", 300, 9), eval_seq_len=48,
                        max_ppl_increase=50.0)
    engine = build_engine(str(tmp_path / "hf"), tmp_path / "tiny-int8", **SHAPE, quant=opts)
    gate = read_manifest(engine).quant["accuracy_gate"]
    with serving(engine) as srv:
        card = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]
        q = card["quantization"]
        assert card["dtype"] == "float32" and q["recipe"] == "int8-weight"
        assert q["accuracy_gate"]["passed"] is True
        assert q["accuracy_gate"]["ppl_quantized"] == gate["ppl_quantized"]
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        out = client.completions.create(model=card["id"], prompt="w5 w6 w7", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
        assert "quantization: int8-weight, gate passed" in srv.output()

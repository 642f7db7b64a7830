"""int8 quantization primitives and the reference int8 linears against float64 computations, and
the calibration / held-out corpora (issue 5's foundations)."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.quant.corpus import builtin_split, read_texts, token_windows
from kiln.quant.int8 import QMAX, dequantize_rows, int8_int8_linear_ref, int8_weight_linear_ref, quantize_rows


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("rows,k", [(1, 7), (64, 576), (5, 4096)])
def test_round_trip_error_is_at_most_half_a_step(rows, k):
    w = rand(rows, k, seed=1, scale=0.05)
    w[0, 3] = 0.9  # an outlier sets its row's scale
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (rows,)
    assert int(q.abs().max()) <= QMAX and (q.abs().amax(dim=1) == QMAX).all()  # every row uses its range
    err = (dequantize_rows(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()
    torch.testing.assert_close(s, w.abs().amax(dim=1) / QMAX)


def test_zero_rows_and_half_precision_inputs():
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    q, s = quantize_rows(w.half())
    assert torch.isfinite(s).all() and s[0] == 1.0 and s[2] == 1.0
    assert not q[0].any() and not q[2].any()
    assert q[1].tolist()[0] == -QMAX and q[1].tolist()[-1] == QMAX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_linear_matches_float64_of_the_dequantized_weight(dtype):
    x, w, b = rand(4, 96, seed=2).to(dtype), rand(40, 96, seed=3, scale=0.1), rand(40, seed=4)
    q, s = quantize_rows(w)
    y = int8_weight_linear_ref(x, q, s, b)
    want = x.double() @ (q.double() * s.double()[:, None]).T + b.double()
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < tol
    # and against the unquantized layer: within the quantization's own bound sum_k |x_k| * s_n / 2
    exact = x.double() @ w.double().T + b.double()
    bound = x.double().abs().sum(1, keepdim=True) * s.double()[None, :] / 2
    assert ((y.double() - exact).abs() <= bound + tol * exact.abs().max()).all()


def test_w8a8_linear_matches_float64_of_both_dequantized_operands():
    x, w = rand(6, 128, seed=5), rand(24, 128, seed=6, scale=0.1)
    x[2, 9] = 20.0  # an activation outlier: its token's scale grows, the others' do not
    q, s = quantize_rows(w)
    xq, xs = quantize_rows(x)
    want = (xq.double() * xs.double()[:, None]) @ (q.double() * s.double()[:, None]).T
    y = int8_int8_linear_ref(x, q, s)
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    rel = ((y - x @ w.T).norm(dim=1) / (x @ w.T).norm(dim=1))
    assert rel.max() < 0.05  # per-token scales keep every row accurate despite the outlier


def test_builtin_corpus_split_is_disjoint_and_large_enough():
    calib, held = builtin_split()
    assert calib and held and not set(calib) & set(held)
    assert builtin_split() == (calib, held)  # fixed
    # ~4 characters a token: the gate's >= 20,000 held-out tokens and 128 x 512 calibration tokens
    assert sum(map(len, held)) > 100_000 and sum(map(len, calib)) > 4 * 128 * 512


def test_read_texts_plain_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    assert read_texts(tmp_path / "a.txt") == ["hello\nworld\n"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: .*'text'"):
        read_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: not valid JSON"):
        read_texts(tmp_path / "d.jsonl")


def test_token_windows():
    assert token_windows([[1, 2, 3], [4, 5]], 3, separator=0) == [[1, 2, 3], [0, 4, 5]]
    assert token_windows([[1, 2, 3, 4, 5, 6, 7]], 3) == [[1, 2, 3], [4, 5, 6]]
    assert token_windows([[1, 2, 3, 4, 5, 6, 7]], 3, max_windows=1) == [[1, 2, 3]]
    with pytest.raises(ValueError):
        token_windows([[1]], 1)


def test_fp8_round_trip_error_is_within_half_an_e4m3_step():
    from kiln.quant.fp8 import FP8_MAX, quantize_rows_fp8

    w = rand(32, 300, seed=7, scale=0.05)
    w[0, 0] = 2.0
    q, s = quantize_rows_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) == FP8_MAX
    rel = w.abs() / s[:, None]  # magnitude in code units
    # E4M3 keeps 3 mantissa bits: half a step is 2^-4 of the value's power of two (2^-10 below 2^-6)
    step = torch.where(rel >= 2 ** -6, 2.0 ** (torch.floor(torch.log2(rel.clamp(min=1e-30))) - 3), 2.0 ** -9)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= step * s[:, None] / 2 * (1 + 1e-6)).all()


def test_fp8_linear_dynamic_and_static_against_float64():
    from kiln.quant.fp8 import FP8_MAX, fp8_codes, fp8_linear_ref, quantize_rows_fp8

    x, w, b = rand(5, 64, seed=8), rand(12, 64, seed=9, scale=0.1), rand(12, seed=10)
    q, s = quantize_rows_fp8(w)
    xq, xs = quantize_rows_fp8(x)
    want = (xq.double() * xs.double()[:, None]) @ (q.double() * s.double()[:, None]).T + b.double()
    assert (fp8_linear_ref(x, q, s, b).double() - want).abs().max() < 1e-5 * want.abs().max()
    a = torch.tensor([1.0 / FP8_MAX])  # static: |x| beyond 1.0 saturates at the calibrated range
    xq2 = fp8_codes(x, a)
    assert float(xq2.float().abs().max()) == FP8_MAX
    want2 = (xq2.double() * a.double()) @ (q.double() * s.double()[:, None]).T
    assert (fp8_linear_ref(x, q, s, None, a).double() - want2).abs().max() < 1e-5 * want2.abs().max()

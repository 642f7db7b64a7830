"""The small-batch fused linear kernel (kiln.kernels.gemv) and the embedding lookup that feeds it,
against torch references composed from the model's own reference ops (RMSNorm, linear, SiLU·mul,
residual add), on random inputs: one row (the FMA path) and 2..16 rows (tensor cores), widths that
are and are not multiples of the tiles, with and without bias, float32 (interpreter) or float16 (GPU).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.kernels.gemv import MAX_ROWS, gemv, gemv_ref  # noqa: E402
from kiln.kernels.norm import embed_rows  # noqa: E402
from kiln.model.layers import rms_norm_ref, silu_mul_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=3e-3, rtol=3e-3) if DTYPE == torch.float16 else dict(atol=2e-5, rtol=2e-5)
SHAPES = [(1, 48, 256), (1, 100, 300), (3, 40, 300), (5, 64, 512), (16, 96, 128)]


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DTYPE).to(DEVICE)


def sumsq(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).sum(-1)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_plain_and_normed(m, n, k, bias):
    x, w = rand(m, k, seed=1, scale=3.0), rand(n, k, seed=2, scale=k ** -0.5)
    b = rand(n, seed=3) if bias else None
    torch.testing.assert_close(gemv(x, w, b), F.linear(x, w, b), **TOL)
    nw = rand(k, seed=4) + 1.0
    y = gemv(x, w, b, norm_weight=nw, ss_in=sumsq(x), eps=1e-5)
    torch.testing.assert_close(y, F.linear(rms_norm_ref(x, nw, 1e-5), w, b), **TOL)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_with_silu(m, n, k, bias):
    x, w = rand(m, k, seed=5), rand(2 * n, k, seed=6, scale=k ** -0.5)
    b = rand(2 * n, seed=7) if bias else None
    nw = rand(k, seed=8) + 1.0
    y = gemv(x, w, b, glu=True, norm_weight=nw, ss_in=sumsq(x), eps=1e-6)
    assert y.shape == (m, n)
    expect = silu_mul_ref(F.linear(rms_norm_ref(x, nw, 1e-6), w, b))
    torch.testing.assert_close(y, expect, **TOL)
    torch.testing.assert_close(gemv_ref(x, w, b, glu=True, norm_weight=nw, ss_in=sumsq(x), eps=1e-6),
                               expect, **TOL)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_residual_epilogue_accumulates_sums_of_squares(m, n, k):
    x, w, b = rand(m, k, seed=9), rand(n, k, seed=10, scale=k ** -0.5), rand(n, seed=11)
    stream = rand(m, n, seed=12, scale=2.0)
    ss = torch.full((m,), 5.0, device=DEVICE)  # accumulated into, not overwritten
    expect = stream + F.linear(x, w, b)
    assert gemv(x, w, b, residual=stream, ss_out=ss) is None
    torch.testing.assert_close(stream, expect, **TOL)
    torch.testing.assert_close(ss, sumsq(expect) + 5.0, rtol=1e-3 if DTYPE == torch.float16 else 1e-5,
                               atol=1e-3)


def test_float32_output_rounds_through_the_model_dtype():
    x, w = rand(2, 128, seed=13), rand(200, 128, seed=14, scale=0.1)
    out = torch.empty(2, 200, dtype=torch.float32, device=DEVICE)
    assert gemv(x, w, out=out) is out
    torch.testing.assert_close(out, F.linear(x, w).float(), **TOL)


def test_refuses_what_it_cannot_do():
    w = rand(32, 64)
    with pytest.raises(ValueError, match="at most"):
        gemv(rand(MAX_ROWS + 1, 64), w)
    with pytest.raises(ValueError, match="does not match"):
        gemv(rand(2, 48), w)
    with pytest.raises(ValueError, match="ss_in"):
        gemv(rand(2, 64), w, norm_weight=rand(64))


@pytest.mark.parametrize("t,n", [(1, 64), (5, 576), (3, 100)])
def test_embed_rows(t, n):
    table = rand(50, n, seed=15)
    ids = torch.tensor([7, 0, 49, 7, 3][:t], device=DEVICE)
    ss = torch.zeros(t, device=DEVICE)
    y = embed_rows(table, ids, ss)
    assert torch.equal(y, table[ids])
    torch.testing.assert_close(ss, sumsq(table[ids]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,n,k,split", [(1, 96, 256, 2), (3, 64, 200, 3), (16, 48, 512, 4)])
def test_split_k_matches_one_pass(m, n, k, split):
    """K split over several programs per column tile; the last to arrive sums the partials and runs
    the epilogue (plain output, and the residual one with its sums of squares). The arrival
    counters are left at zero for the next launch (a CUDA-graph replay)."""
    from kiln.kernels.gemv import _arrival_counters

    block_m = 1 if m == 1 else 16
    cfg = (block_m, 16, 64, 4, 2, split)
    x, w, b = rand(m, k, seed=21), rand(n, k, seed=22, scale=k ** -0.5), rand(n, seed=23)
    torch.testing.assert_close(gemv(x, w, b, config=cfg), F.linear(x, w, b), **TOL)
    stream = rand(m, n, seed=24, scale=2.0)
    ss = torch.zeros(m, device=DEVICE)
    expect = stream + F.linear(x, w, b)
    assert gemv(x, w, b, residual=stream, ss_out=ss, config=cfg) is None
    torch.testing.assert_close(stream, expect, **TOL)
    torch.testing.assert_close(ss, sumsq(expect), rtol=1e-3 if DTYPE == torch.float16 else 1e-5, atol=1e-3)
    assert not _arrival_counters(x.device, 0).any()

"""The quantized-linear kernels against float64 computations of their contracts: quant_gemm (int8
weights with float activations, int8 x int8, fp8 x fp8), per-token activation quantization, and the
small-batch gemv streaming int8 / fp8 codes. The Triton interpreter runs them on the CPU (float32
activations); on a GPU (KILN_TEST_DEVICE=cuda) float16 and bfloat16."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.kernels.gemv import gemv  # noqa: E402
from kiln.kernels.quant_gemm import quant_gemm, quantize_activations  # noqa: E402
from kiln.model.layers import rms_norm_ref, silu_mul_ref  # noqa: E402
from kiln.quant.fp8 import FP8_DTYPE, FP8_MAX, fp8_codes, quantize_rows_fp8  # noqa: E402
from kiln.quant.int8 import QMAX, quantize_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def tol(dtype):
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}[dtype]


def codes(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(w) if kind == "int8" else quantize_rows_fp8(w)


def exact(a_codes, w_codes, a_scale, w_scale, bias=None):
    """float64 (a @ w^T) * a_scale * w_scale + bias: the contract, computed independently."""
    y = (a_codes.double() @ w_codes.double().T) * w_scale.double()[None, :]
    if a_scale is not None:
        y = y * a_scale.double()[:, None]
    return y if bias is None else y + bias.double()


GEMM_SHAPES = [(17, 40, 64), (33, 96, 200), (70, 130, 96)]  # M > 16, uneven N and K


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_weight_codes_with_float_activations(dtype, m, n, k, kind):
    x = rand(m, k, seed=1, dtype=dtype)
    q, s = codes(rand(n, k, seed=2, scale=0.05), kind)
    b = rand(n, seed=3, dtype=dtype)
    y = quant_gemm(x, q, s, b)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.double(), exact(x, q, None, s, b), **tol(dtype))


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_activations_times_quantized_weights(m, n, k, kind):
    dtype = DTYPES[0]
    x = rand(m, k, seed=4, scale=2.0, dtype=dtype)
    x[3, 5] = 40.0  # an outlier channel
    q, s = codes(rand(n, k, seed=5, scale=0.05), kind)
    xq, xs = quantize_activations(x, kind)
    y = quant_gemm(xq, q, s, None, a_scale=xs, out_dtype=torch.float32)
    # int8 products are exact in int32; fp8 ones in float32, summed in float32 (on Hopper the fp8
    # MMA accumulates each K tile in reduced precision before its fp32 promotion)
    rt = 1e-6 if kind == "int8" else (1e-3 if DEVICE == "cuda" else 1e-5)
    torch.testing.assert_close(y.double(), exact(xq, q, xs, s), rtol=rt, atol=rt * float(y.abs().max()))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_activation_quantization_matches_the_reference(kind):
    dtype = DTYPES[0]
    x = rand(19, 300, seed=6, scale=3.0, dtype=dtype)
    x[2] = 0.0  # a zero row: scale 1, codes 0
    x[4, :4] = torch.tensor([-12.0, 0.5, 1.5, 2.5])  # ties of half a step after scaling
    xq, xs = quantize_activations(x, kind)
    rq, rs = quantize_rows(x) if kind == "int8" else quantize_rows_fp8(x)
    torch.testing.assert_close(xs, rs.to(DEVICE))
    assert xq.dtype == rq.dtype
    assert torch.equal(xq.float(), rq.to(DEVICE).float())
    assert xs[2] == 1.0 and not xq[2].float().any()
    if kind == "int8":
        assert int(xq.abs().max()) <= QMAX


def test_static_fp8_scale_saturates():
    dtype = DTYPES[0]
    x = rand(20, 64, seed=7, dtype=dtype)
    x[0, 0] = 1e4  # far beyond the calibrated range
    scale = torch.tensor([2.0 / FP8_MAX], device=DEVICE)
    xq, xs = quantize_activations(x, "fp8", scale)
    assert torch.equal(xs, scale.expand(20))
    assert xq[0, 0].float() == FP8_MAX and torch.isfinite(xq.float()).all()
    assert torch.equal(xq.float(), fp8_codes(x, scale).float())


SMALL = [(1, 48, 256), (3, 40, 300), (16, 96, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SMALL)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gemv_streams_codes(dtype, m, n, k, kind):
    x = rand(m, k, seed=8, dtype=dtype)
    q, s = codes(rand(n, k, seed=9, scale=k ** -0.5), kind)
    b = rand(n, seed=10, dtype=dtype)
    torch.testing.assert_close(gemv(x, q, b, w_scale=s).double(), exact(x, q, None, s, b), **tol(dtype))
    # normed input: the norm is applied to x before the codes (RMSNorm reference roundings)
    nw = rand(k, seed=11, dtype=dtype) + 1.0
    y = gemv(x, q, b, w_scale=s, norm_weight=nw, ss_in=x.float().pow(2).sum(-1), eps=1e-5)
    torch.testing.assert_close(y.double(), exact(rms_norm_ref(x, nw, 1e-5), q, None, s, b), **tol(dtype))


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gemv_codes_glu_and_split_k_residual(m, kind):
    dtype = DTYPES[0]
    k, n = 256, 64
    x = rand(m, k, seed=12, dtype=dtype)
    q, s = codes(rand(2 * n, k, seed=13, scale=k ** -0.5), kind)
    y = gemv(x, q, None, w_scale=s, glu=True, norm_weight=torch.ones(k, dtype=dtype, device=DEVICE),
             ss_in=x.float().pow(2).sum(-1), eps=1e-6)
    gate_up = exact(rms_norm_ref(x, torch.ones(k, dtype=dtype, device=DEVICE), 1e-6), q, None, s)
    torch.testing.assert_close(y.double(), silu_mul_ref(gate_up.to(dtype)).double(), **tol(dtype))
    # split-K (down_proj's shape class) with the residual epilogue
    q2, s2 = codes(rand(32, 1024, seed=14, scale=0.03), kind)
    a = rand(m, 1024, seed=15, dtype=dtype)
    stream = rand(m, 32, seed=16, dtype=dtype)
    expect = stream.double() + exact(a, q2, None, s2).to(dtype).double()
    ss = torch.zeros(m, device=DEVICE)
    cfg = (1 if m == 1 else 16, 16, 64, 4, 2, 4)
    gemv(a, q2, None, w_scale=s2, residual=stream, ss_out=ss, config=cfg)
    torch.testing.assert_close(stream.double(), expect, **tol(dtype))


@pytest.mark.skipif(DEVICE != "cuda", reason="cuBLAS fp8 (torch._scaled_mm) is a GPU path")
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_gemm_through_cublas(dtype):
    from kiln.kernels.quant_gemm import fp8_gemm, probe_scaled_mm

    mode = probe_scaled_mm(torch.device("cuda"), dtype)
    if torch.cuda.get_device_capability() < (8, 9):  # no fp8 GEMM in cuBLAS: the probe must say so
        assert mode == "triton"  # (and fp8 engines are refused there: kiln.engine.model_runner)
        return
    assert mode in ("direct", "via-bf16")  # cuBLAS serves it (else fp8_gemm would fall back to Triton)
    x = rand(40, 256, seed=19, scale=2.0, dtype=dtype)
    q, s = quantize_rows_fp8(rand(96, 256, seed=20, scale=0.05))
    b = rand(96, seed=21, dtype=dtype)
    xq, xs = quantize_activations(x, "fp8")
    y = fp8_gemm(xq, q, xs, s, b, dtype)
    assert y.dtype == dtype, mode
    ref = exact(xq, q, xs, s, b)
    torch.testing.assert_close(y.double(), ref, **tol(dtype))


def test_codes_without_scales_are_refused():
    x = rand(2, 64, seed=17, dtype=DTYPES[0])
    q, _ = quantize_rows(rand(8, 64, seed=18))
    with pytest.raises(ValueError, match="w_scale"):
        gemv(x, q)
    with pytest.raises(ValueError, match="a_scale"):
        quant_gemm(quantize_activations(x, "int8")[0], q, torch.ones(8, device=DEVICE))
    assert FP8_DTYPE == torch.float8_e4m3fn

"""GEMMs on quantized weights with the dequantization fused, and per-token activation quantization.

`quant_gemm`: y[M, N] = (a[M, K] @ w[N, K]^T) * a_scale[M, None] * w_scale[None, N] + bias, with
w the int8 or float8_e4m3fn codes of a quantized linear layer (kiln.quant.linear):
- a in the engine dtype (int8-weight): each weight tile is converted to a's dtype after it is loaded
  (int8 codes are exact in fp16/bf16) and multiplied on the tensor cores; no full-precision copy of
  the weight ever exists;
- a int8 (int8-sq): int8 x int8 products accumulated exactly in int32;
- a float8_e4m3fn (fp8): fp8 x fp8 products accumulated in float32.
The scales and the bias are applied to the accumulator tile before the one store, in the order of
the torch references (kiln.quant.int8 / kiln.quant.fp8).

`quantize_activations`: each row of x to int8 (scale = max|x| / 127, round half to even) or E4M3
(scale = max|x| / 448, or one static scale with saturation), codes and float32 scales per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.codes import fast_codes, int8_to_half, round_to_e4m3
from kiln.quant.fp8 import FP8_DTYPE, FP8_MAX
from kiln.quant.int8 import QMAX

@triton.jit
def _qgemm_kernel(
    A, B, AS, BS, Bias, C, M, N, K, stride_am, stride_cm,
    A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, CONVERT_B: tl.constexpr, INT_ACC: tl.constexpr,
    IEEE: tl.constexpr, EVEN_K: tl.constexpr, INT8_B: tl.constexpr, PRECISE_FP8: tl.constexpr,
    FAST_CODES: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # programs of GROUP_M row tiles share weight tiles in L2
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptr = A + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptr = B + rn.to(tl.int64)[:, None] * K + rk[None, :]
    if INT_ACC:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    elif SWAP_AB:  # weight tile as the MMA's first operand (from registers), the result transposed
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptr, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if CONVERT_B:
            if INT8_B:
                b = int8_to_half(b, FAST_CODES)
            b = b.to(A.dtype.element_ty)
        if INT_ACC:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        elif SWAP_AB:
            acc = tl.dot(b, tl.trans(a), acc)
        elif PRECISE_FP8:  # Hopper's fp8 MMA accumulates in reduced precision: promote to fp32 once
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)  # per K tile, as cuBLAS
        elif IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    if SWAP_AB:
        y = tl.trans(acc)
    else:
        y = acc.to(tl.float32)
    if A_SCALE:
        y = y * tl.load(AS + rm, mask=m_ok, other=0.0)[:, None]
    y = y * tl.load(BS + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptr, y.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm_config(m: int, n: int, a_dtype: torch.dtype) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, SWAP_AB]), from the sweep of
    benchmarks/gpu_quant_kernels.py on an H100 at llama-2-7b shapes."""
    if a_dtype == torch.float32:  # CPU interpreter tests: small tiles
        return 32, 32, 32, 4, 4, 2
    if a_dtype in (torch.float16, torch.bfloat16):  # int8-weight: weight tiles converted in the loop
        return (128, 64, 64, 8, 4, 4) if m <= 512 else (128, 128, 64, 8, 8, 3)
    if m <= 512:  # int8 x int8, fp8 x fp8: decode batches
        return (64, 128, 128, 8, 4, 4) if n <= 8192 else (128, 128, 128, 8, 8, 3)
    return (128, 256, 128, 8, 8, 3) if a_dtype == FP8_DTYPE else (128, 128, 128, 8, 8, 3)


def quant_gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               a_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               config: tuple[int, ...] | None = None) -> torch.Tensor:
    """y = (a @ w^T) * a_scale[:, None] * w_scale[None, :] + bias (module docstring), [M, N] in
    `out_dtype` (default a's dtype; give it for int8/fp8 a)."""
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k or not w.is_contiguous() or a.stride(-1) != 1:
        raise ValueError("quant_gemm needs a [M, K] with a contiguous last dimension and a contiguous w [N, K]")
    quant_a = a.dtype in (torch.int8, FP8_DTYPE)
    if quant_a and (a_scale is None or a.dtype != w.dtype):
        raise ValueError("quantized activations need a_scale and codes of the weight's dtype")
    out_dtype = out_dtype or a.dtype
    y = torch.empty(m, n, dtype=out_dtype, device=a.device)
    bm, bn, bk, gm, warps, stages, *swap = config or _gemm_config(m, n, a.dtype)
    swap = bool(swap and swap[0])
    if swap and quant_a:
        raise ValueError("SWAP_AB is for float activations (int8-weight)")
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _qgemm_kernel[grid](
        a, w, a_scale if a_scale is not None else w_scale, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, a.stride(0), y.stride(0),
        A_SCALE=a_scale is not None, HAS_BIAS=bias is not None, CONVERT_B=not quant_a,
        INT_ACC=a.dtype == torch.int8, IEEE=a.dtype == torch.float32, EVEN_K=k % bk == 0,
        INT8_B=w.dtype == torch.int8, PRECISE_FP8=a.dtype == FP8_DTYPE and a.is_cuda,
        FAST_CODES=fast_codes(w), SWAP_AB=swap,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
    )
    return y


_SCALED_MM: dict = {}  # (device index, out dtype) -> how torch._scaled_mm serves fp8 here (probe_scaled_mm)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def probe_scaled_mm(device: torch.device, out_dtype: torch.dtype) -> str:
    """Once per device and dtype, before any CUDA graph is captured: can cuBLAS's fp8 GEMM with
    per-row and per-column scales (torch._scaled_mm) write `out_dtype` ("direct"), only bfloat16
    ("via-bf16"), or not at all ("triton")? Its accumulation is exact enough (promoted to fp32,
    unlike Triton's fp8 MMA, whose promotion per K tile costs 2-3x at prefill sizes)."""
    key = (_index(device), out_dtype)
    if key not in _SCALED_MM:
        a = torch.ones(32, 32, device=device).to(FP8_DTYPE)
        sa, sb = torch.ones(32, 1, device=device), torch.ones(1, 32, device=device)
        mode = "triton"
        for cand, dt in (("direct", out_dtype), ("via-bf16", torch.bfloat16)):
            try:
                y = torch._scaled_mm(a, a.T, scale_a=sa, scale_b=sb, out_dtype=dt)
                if float(y[0, 0]) == 32.0:
                    mode = cand
                    break
            except (RuntimeError, TypeError, ValueError):
                continue
        _SCALED_MM[key] = mode
    return _SCALED_MM[key]


def fp8_gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8 x fp8 with both scales (and bias): cuBLAS where probe_scaled_mm found it, else quant_gemm."""
    mode = _SCALED_MM.get((_index(a.device), out_dtype), "triton") if a.is_cuda else "triton"
    if mode == "triton":
        return quant_gemm(a, w, w_scale, bias, a_scale=a_scale, out_dtype=out_dtype)
    dt = out_dtype if mode == "direct" else torch.bfloat16
    y = torch._scaled_mm(a, w.T, scale_a=a_scale[:, None], scale_b=w_scale[None, :], out_dtype=dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y if dt == out_dtype else y.to(out_dtype)


@triton.jit
def _act_quant_kernel(X, Q, S, STATIC, K, stride_xm, stride_qm, QMAX_F: tl.constexpr,
                      FP8: tl.constexpr, HAS_STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_xm
    q_row = Q + row.to(tl.int64) * stride_qm
    if HAS_STATIC:
        scale = tl.load(STATIC)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            rk = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)))
        m = tl.max(amax, axis=0)
        scale = tl.where(m > 0, m / QMAX_F, 1.0)
    tl.store(S + row, scale)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32) / scale
        v = tl.minimum(tl.maximum(v, -QMAX_F), QMAX_F)
        if FP8:
            q = round_to_e4m3(v).to(Q.dtype.element_ty)
        else:
            q = ((v + 12582912.0) - 12582912.0).to(tl.int8)  # + 1.5 * 2^23: round half to even, as torch.round
        tl.store(q_row + rk, q, mask=rk < K)


def quantize_activations(x: torch.Tensor, kind: str, static_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] int8 or float8_e4m3fn, float32 scales [M]); `static_scale` [1]
    (fp8 only) replaces the per-row maxima."""
    m, k = x.shape
    fp8 = kind == "fp8"
    q = torch.empty(m, k, dtype=FP8_DTYPE if fp8 else torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _act_quant_kernel[(m,)](x, q, s, static_scale if static_scale is not None else s, k, x.stride(0),
                                q.stride(0), QMAX_F=FP8_MAX if fp8 else float(QMAX), FP8=fp8,
                                HAS_STATIC=static_scale is not None, BLOCK=block, num_warps=4)
    return q, s

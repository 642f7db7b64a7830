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

from kiln.quant.fp8 import FP8_DTYPE, FP8_MAX
from kiln.quant.int8 import QMAX

@triton.jit
def _qgemm_kernel(
    A, B, AS, BS, Bias, C, M, N, K, stride_am, stride_cm,
    A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, CONVERT_B: tl.constexpr, INT_ACC: tl.constexpr,
    IEEE: tl.constexpr, EVEN_K: tl.constexpr,
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
            b = b.to(A.dtype.element_ty)
        if INT_ACC:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        elif IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    y = acc.to(tl.float32)
    if A_SCALE:
        y = y * tl.load(AS + rm, mask=m_ok, other=0.0)[:, None]
    y = y * tl.load(BS + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptr, y.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm_config(m: int, n: int, k: int, a_bytes: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)."""
    if a_bytes == 4:  # float32 activations (CPU interpreter tests): small tiles
        return 32, 32, 32, 4, 4, 2
    bk = 128 if a_bytes == 1 else 64
    if m <= 64:
        return 64, 64, bk, 8, 4, 4
    return 128, 128, bk, 8, 8, 3


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
    bm, bn, bk, gm, warps, stages = config or _gemm_config(m, n, k, a.element_size())
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _qgemm_kernel[grid](
        a, w, a_scale if a_scale is not None else w_scale, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, a.stride(0), y.stride(0),
        A_SCALE=a_scale is not None, HAS_BIAS=bias is not None, CONVERT_B=not quant_a,
        INT_ACC=a.dtype == torch.int8, IEEE=a.dtype == torch.float32, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
    )
    return y


@triton.jit
def round_to_e4m3(v):
    """float32 v (|v| <= 448) rounded to the nearest E4M3 value, ties to even, still in float32: the
    cast that follows is then exact on every backend (the Triton interpreter's own rounding of
    values just below a power of two is wrong)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000  # keep 3 mantissa bits
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (v + 24576.0) - 24576.0  # 1.5 * 2^14: steps of 2^-9 below 2^-6
    return tl.where(tl.abs(v) >= 0.015625, normal, subnormal)


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

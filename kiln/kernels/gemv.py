"""Small-batch linear layers (a few rows against a large weight) with the ops around them fused in.

At decode batch sizes a linear layer is a pass over its weight: y[M, N] = x[M, K] @ W[N, K]^T for
M <= 16 reads N*K weights and only M*K activations. This kernel streams W once, tile by tile
(program p owns output columns [p*BLOCK_N, (p+1)*BLOCK_N)), and folds into that pass the small ops
that would otherwise each be a kernel launch of their own:

- NORM (prologue): x is the residual stream; each row is RMS-normalized on the fly with the row's
  sum of squares, which the kernel that last wrote the stream accumulated (SS_IN), then scaled by
  the norm weight: the roundings of kiln.model.layers.rms_norm_ref.
- GLU (epilogue): the weight is the fused gate|up projection [2I, K]; program p also streams the
  up rows that match its gate rows and writes silu(gate) * up [M, I], rounded as
  kiln.model.layers.silu_mul_ref rounds: the MLP's activation never makes a round trip to memory.
- bias (epilogue).
- W_SCALE (dequantization): the weight holds a quantized linear's int8 or fp8 codes
  (kiln.quant.linear); each output column's float32 scale multiplies the accumulator before the
  rest of the epilogue. The codes are converted to the activation dtype as they are loaded, so a
  decode step streams one byte per weight.
- RESIDUAL (epilogue): the output is added into the residual stream R in place (each program owns
  its columns) and the squares of the new stream are accumulated into SS_OUT (one float32 atomic add
  per row and program) for the next NORM consumer. SS_OUT must be zeroed before the first producer.

With 128 column tiles against a long K (down_proj: N = 4096, K = 11008), too few programs to keep
every SM streaming, K is split (SPLIT_K programs per column tile): each split stores its float32
partial, and the last to arrive (an atomic counter per tile, left at zero for the next launch) sums
the partials in split order and runs the epilogue.

The torch reference is `gemv_ref`; the model's small-batch decode path (kiln.model.llama) chains
these calls so that a decoder layer is six launches: qkv, rope + cache write, attention, o_proj,
gate_up + silu, down.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.arrival import arrival_counters
from kiln.kernels.codes import fast_codes, int8_to_half
from kiln.kernels.paged_tile import dot

MAX_ROWS = 16  # tl.dot needs 16 rows: 2..16 rows are padded to 16 (masked, never stored); one row
# takes an FMA path instead (BLOCK_M = 1), which skips the padding's prologue work.


@triton.jit(do_not_specialize=["M"])  # one compiled variant for 2..16 rows
def _gemv_kernel(
    X, W, WSC, Bias, NW, SS_IN, R, SS_OUT, Y, WS, CNT,
    M, N, K, stride_xm, stride_rm, stride_ym, eps,
    NORM: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
    W_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr, IEEE: tl.constexpr, INT8_W: tl.constexpr, FAST_CODES: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    dt = X.dtype.element_ty  # the activation (model) dtype; W is the same, or int8 / fp8 codes
    if NORM:
        rstd = tl.rsqrt(tl.load(SS_IN + rm, mask=m_ok, other=0.0) / K + eps)
    if BLOCK_M == 1:  # one row: products on the FMA units, one reduction at the end
        acc_w = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if GLU:
            acc_wu = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:  # tensor cores
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if GLU:
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_ptr = W + rn.to(tl.int64)[:, None] * K
    x_ptr = X + rm[:, None] * stride_xm
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # split pid_k takes K columns [k_lo, k_hi)
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w_mask = n_ok[:, None]
        x_mask = m_ok[:, None]
        if not EVEN_K:
            w_mask = w_mask & (rk < K)[None, :]
            x_mask = x_mask & (rk < K)[None, :]
        w = tl.load(w_ptr + rk[None, :], mask=w_mask, other=0.0)
        if GLU:
            wu = tl.load(w_ptr + N * K + rk[None, :], mask=w_mask, other=0.0)
        if INT8_W:  # codes -> fp16 on the integer/fp16 units (kiln.kernels.codes)
            w = int8_to_half(w, FAST_CODES)
            if GLU:
                wu = int8_to_half(wu, FAST_CODES)
        x = tl.load(x_ptr + rk[None, :], mask=x_mask, other=0.0)
        if NORM:
            nw = tl.load(NW + rk, mask=rk < K, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * rstd[:, None]).to(dt)
            x = (x.to(tl.float32) * nw[None, :]).to(dt)
        if BLOCK_M == 1:
            xf = x.to(tl.float32)
            acc_w += w.to(tl.float32) * xf
            if GLU:
                acc_wu += wu.to(tl.float32) * xf
        else:
            if W_SCALE:  # codes are exact in the activation dtype
                w = w.to(dt)
                if GLU:
                    wu = wu.to(dt)
            acc += dot(x, tl.trans(w), IEEE)
            if GLU:
                acc_u += dot(x, tl.trans(wu), IEEE)
    if BLOCK_M == 1:
        acc = tl.sum(acc_w, axis=1)[None, :]
        if GLU:
            acc_u = tl.sum(acc_wu, axis=1)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:  # (not with GLU) each split stores its partial; the last to arrive sums them
        ws = WS + rm[:, None] * N + rn[None, :]
        tl.store(ws + pid_k * BLOCK_M * N, acc, mask=ok)
        tl.debug_barrier()  # as in paged_decode: partials stored, then published by the release
        last = tl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for sp in range(0, SPLIT_K):  # fixed order: the sum does not depend on arrival order
                acc += tl.load(ws + sp * BLOCK_M * N, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(CNT + pid, 0, sem="relaxed", scope="gpu")
        ok = tl.where(last, ok, False)  # only the last arrival runs the epilogue
        m_ok = tl.where(last, m_ok, False)
    if W_SCALE:
        acc = acc * tl.load(WSC + rn, mask=n_ok, other=0.0)[None, :]
        if GLU:
            acc_u = acc_u * tl.load(WSC + N + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_u += tl.load(Bias + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dt)
    if GLU:  # silu(gate) rounded to the model dtype, then times up: silu_mul_ref's roundings
        g = out.to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt)
        out = (a.to(tl.float32) * acc_u.to(dt).to(tl.float32)).to(dt)
    if RESIDUAL:
        r_ptr = R + rm[:, None] * stride_rm + rn[None, :]
        s = (tl.load(r_ptr, mask=ok, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dt)
        tl.store(r_ptr, s, mask=ok)
        sf = tl.where(ok, s.to(tl.float32), 0.0)
        tl.atomic_add(SS_OUT + rm, tl.sum(sf * sf, axis=1), mask=m_ok)
    else:
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], out.to(Y.dtype.element_ty), mask=ok)


def _config(n: int, k: int, m: int, glu: bool, norm: bool, itemsize: int) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K]) for m rows against n output
    columns, chosen from the sweep of benchmarks/gpu_gemv.py on an H100 (Llama-2-7B shapes)."""
    fma = m == 1 and norm  # one row to normalize: the FMA path skips 15 padding rows' prologue
    if itemsize == 4:  # float32 (tests): small tiles, or shared memory runs out
        return (1 if fma else MAX_ROWS), 16, 64, 4, 2
    if fma:  # registers hold BLOCK_N x BLOCK_K float32 products per weight
        return (1, 8, 512, 4, 3) if glu else (1, 16, 256, 4, 3)
    if glu:  # two weight tiles (gate and up) per step
        return MAX_ROWS, 32, 128, 4, 3
    if n <= 4096 and k > 2 * n:  # down_proj: 128 column tiles; two (four) splits of K fill the GPU
        return (MAX_ROWS, 32, 256, 4, 3, 2) if m == 1 else (MAX_ROWS, 64, 256, 4, 3, 4)
    if n <= 4096:
        return MAX_ROWS, 32, 256, 4, 5
    return MAX_ROWS, 64 if n >= 16384 else 32, 256, 4, 3


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """One counter per column tile, for split-K launches (kiln.kernels.arrival)."""
    return arrival_counters("gemv", device, n, 1 << 14)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, ss_in: torch.Tensor | None = None, eps: float = 0.0,
         glu: bool = False, residual: torch.Tensor | None = None, ss_out: torch.Tensor | None = None,
         out: torch.Tensor | None = None, config: tuple[int, ...] | None = None,
         w_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """y = f(x) @ weight^T (+ bias) for x [M <= 16, K] and a contiguous weight [N, K].

    w_scale [N] (or [2I] with glu) float32: weight holds int8 / float8_e4m3fn codes, and each
    output column is scaled by its w_scale (dequantization in the epilogue).
    norm_weight (with ss_in [M] float32, the rows' sums of squares): f is the RMSNorm.
    glu: weight is a fused gate|up [2I, K] (bias [2I]); y = silu(x @ gate^T) * (x @ up^T) [M, I].
    residual [M, N] (with ss_out [M] float32): y is added into `residual` in place, the new rows'
    sums of squares are added into `ss_out`, and None is returned. Otherwise y is returned (written
    into `out` when given: [M, N], any float dtype)."""
    m, k = x.shape
    n = weight.shape[0] // (2 if glu else 1)
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
    if not weight.is_contiguous() or x.stride(-1) != 1:
        raise ValueError("gemv needs a contiguous weight and rows with a contiguous last dimension")
    if weight.shape[1] != k:
        raise ValueError(f"input width {k} does not match the weight's {weight.shape[1]} columns")
    if (norm_weight is None) != (ss_in is None) or (residual is None) != (ss_out is None):
        raise ValueError("norm_weight needs ss_in and residual needs ss_out")
    y = None
    if residual is None:
        y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages, *split = config or _config(
        n, k, m, glu, norm_weight is not None, x.element_size())
    split_k = split[0] if split else 1
    if split_k > 1 and glu:
        raise ValueError("split-K does not combine with the gate|up epilogue")
    dummy = weight
    tiles = triton.cdiv(n, block_n)
    ws = cnt = dummy
    if split_k > 1:
        ws = torch.empty(split_k * block_m * n, dtype=torch.float32, device=x.device)
        cnt = _arrival_counters(x.device, tiles)
    if (w_scale is None) != (weight.dtype == x.dtype):
        raise ValueError("a weight of another dtype than x must be quantized codes with w_scale")
    _gemv_kernel[(tiles, split_k)](
        x, weight, w_scale if w_scale is not None else dummy, bias if bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        ss_in if ss_in is not None else dummy,
        residual if residual is not None else dummy,
        ss_out if ss_out is not None else dummy,
        y if y is not None else dummy, ws, cnt,
        m, n, k, x.stride(0), residual.stride(0) if residual is not None else 0,
        y.stride(0) if y is not None else 0, eps,
        NORM=norm_weight is not None, GLU=glu, HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None, W_SCALE=w_scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        SPLIT_K=split_k, IEEE=x.dtype == torch.float32, INT8_W=weight.dtype == torch.int8,
        FAST_CODES=fast_codes(weight),
        num_warps=warps, num_stages=stages,
    )
    return y


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
             norm_weight: torch.Tensor | None = None, ss_in: torch.Tensor | None = None, eps: float = 0.0,
             glu: bool = False, residual: torch.Tensor | None = None, ss_out: torch.Tensor | None = None,
             out: torch.Tensor | None = None, config=None, w_scale=None) -> torch.Tensor | None:
    """The same contract in torch ops (kiln.model.layers' and kiln.quant's references), for tests."""
    from kiln.model.layers import silu_mul_ref
    from kiln.quant.int8 import int8_weight_linear_ref

    dtype = x.dtype
    if norm_weight is not None:
        rstd = torch.rsqrt(ss_in / x.shape[1] + eps)
        x = norm_weight * (x.float() * rstd[:, None]).to(dtype)
    if w_scale is not None:  # (exact for fp8 codes too: the reference only upcasts them)
        y = int8_weight_linear_ref(x, weight, w_scale, bias)
    else:
        y = torch.nn.functional.linear(x, weight, bias)
    if glu:
        y = silu_mul_ref(y)
    if residual is not None:
        residual.copy_(residual + y)
        ss_out.add_(residual.float().pow(2).sum(-1))
        return None
    if out is not None:
        out.copy_(y)
        return out
    return y

"""SiLU(gate) * up over the fused gate|up projection's output, in one kernel.

Reads [T, 2I] (gate in the first half of each row, up in the second) and writes [T, I]; silu is
computed in float32 and rounded to the model dtype before the product, as the reference
(`F.silu(gate) * up` in the model dtype) rounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(GU, O, stride_g, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    g = tl.load(GU + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_g + I + cols, mask=ok, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(O.dtype.element_ty).to(tl.float32)
    tl.store(O + row * stride_o + cols, (a * u).to(O.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (last dim contiguous) -> [T, I]."""
    if gate_up.stride(-1) != 1 or gate_up.shape[-1] % 2:
        raise ValueError("silu_mul needs [T, 2I] rows with a contiguous last dimension")
    t, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(i), 1024)
    _silu_mul_kernel[(t, triton.cdiv(i, block))](gate_up, out, gate_up.stride(0), out.stride(0), i,
                                                 BLOCK=block, num_warps=4)
    return out

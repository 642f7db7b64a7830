"""Conversions of quantized codes inside Triton kernels, at the speed of the integer and fp16 units.

`int8_to_half`: int8 codes -> float16, exactly. A plain cast goes through the I2F conversion unit,
which on an H100 converts 16 values per clock per SM: streaming int8 weights at 3 TB/s needs ~3e12
conversions a second, more than that unit gives, and a small-batch GEMV over int8 codes measured
1.7-2.0 TB/s (fp16 weights: 2.7). Instead: flip the sign bit (x + 128 as a byte), put the byte
under the exponent of 1024 (fp16 bits 0x6400 | byte = 1024 + byte, exact), subtract 1152. With
FAST (CUDA), four codes at a time in PTX: one xor of the 32-bit word, two byte permutes that build
two fp16 pairs, two paired subtractions; otherwise the same steps in Triton ops (the interpreter).

`round_to_e4m3`: float32 values rounded to the E4M3 grid before the cast to float8 (see there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def int8_to_half(w, FAST: tl.constexpr):
    """int8 tensor -> float16 tensor of the same values (-128..127 are exact in fp16)."""
    if FAST:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, k;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 $0, t, 0x64646464, 0x4140;
            prmt.b32 $1, t, 0x64646464, 0x4342;
            mov.b32 k, 0x64806480;
            sub.f16x2 $0, $0, k;
            sub.f16x2 $1, $1, k;
            }""",
            constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4)
    byte = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16)
    return (byte | 0x6400).to(tl.float16, bitcast=True) - 1152.0


_PTX = torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


def fast_codes(t: torch.Tensor) -> bool:
    """Whether kernels on tensor t's device take int8_to_half's PTX path (CUDA, not the interpreter)."""
    return _PTX and t.is_cuda


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



"""The quantized linear layer of a quantized engine (kiln.quant.recipe).

On the CPU each recipe runs its reference (kiln.quant.int8 / kiln.quant.fp8): exact integer or fp8
products, scaled after the dot product. On a GPU the dequantization happens inside the kernels and
the full-precision weight never exists:

- a few rows (decode at batch <= 16: kiln.kernels.gemv) stream the codes and scale each output in
  the epilogue, with activations in the engine dtype for every recipe: at these sizes the step is
  a pass over the weights, which quantizing the activations would not shorten;
- more rows (prefill, large decode batches: kiln.kernels.quant_gemm): int8-weight converts each
  weight tile to the activation dtype inside the GEMM; int8-sq and fp8 quantize the activations per
  token (or with fp8's static scale) in one pass, then multiply int8 x int8 -> int32 (Triton, both
  scales and the bias fused into the epilogue) or fp8 x fp8 (cuBLAS through torch._scaled_mm with
  per-row and per-column scales, where the device has it: Triton's fp8 MMA needs per-tile fp32
  promotion to be accurate on Hopper, which made it 2-3x slower at prefill sizes).

A linear whose input is rotated online (down_proj with the scheme's Hadamard rotations,
kiln.quant.rotate) rotates x first on every path: its stored weight is rotated too.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import use_kernels
from kiln.quant.fp8 import FP8_DTYPE, fp8_linear_ref
from kiln.quant.int8 import int8_weight_linear_ref, quantize_rows
from kiln.quant.recipe import QuantScheme
from kiln.quant.rotate import block_rotate


class QuantLinear(nn.Module):
    """y = x @ dequant(qweight)^T + bias, computed per `scheme` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme, rotate: int = 0):
        super().__init__()
        self.scheme = scheme
        self.rotate = rotate  # Hadamard block of the online input rotation; 0: none
        self.in_features, self.out_features = in_features, out_features
        wdtype = torch.int8 if scheme.weight_dtype == "int8" else FP8_DTYPE
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=wdtype))
        self.register_buffer("wscale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if scheme.static_act_scale:
            self.register_buffer("act_scale", torch.empty(1, dtype=torch.float32))
        else:
            self.act_scale = None

    def extra_repr(self) -> str:
        rot = f", rotate={self.rotate}" if self.rotate else ""
        return f"in={self.in_features}, out={self.out_features}, recipe={self.scheme.recipe}{rot}"

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x as the stored weight expects it: rotated when the layer rotates its input."""
        return block_rotate(x, self.rotate) if self.rotate else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        if use_kernels(x) and x.dim() == 2:
            return self._forward_gpu(x)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = self.scheme.act_quant
        if act is None:
            y = int8_weight_linear_ref(x2, self.qweight, self.wscale, self.bias)
        elif act == "int8":
            xq, xs = quantize_rows(x2)
            acc = torch._int_mm(xq, self.qweight.T)  # exact int32 on the CPU for any row count
            y = acc.float() * xs[:, None] * self.wscale[None, :]
            y = (y + self.bias.float() if self.bias is not None else y).to(x.dtype)
        else:
            y = fp8_linear_ref(x2, self.qweight, self.wscale, self.bias, self.act_scale)
        return y.reshape(*shape[:-1], self.out_features)

    def _forward_gpu(self, x: torch.Tensor) -> torch.Tensor:
        from kiln.kernels.gemv import MAX_ROWS, gemv
        from kiln.kernels.quant_gemm import fp8_gemm, quant_gemm, quantize_activations

        if x.shape[0] <= MAX_ROWS:
            return gemv(x, self.qweight, self.bias, w_scale=self.wscale)
        act = self.scheme.act_quant
        if act is None:
            return quant_gemm(x, self.qweight, self.wscale, self.bias)
        xq, xs = quantize_activations(x, act, self.act_scale)
        if act == "fp8":
            return fp8_gemm(xq, self.qweight, xs, self.wscale, self.bias, x.dtype)
        return quant_gemm(xq, self.qweight, self.wscale, self.bias, a_scale=xs, out_dtype=x.dtype)


def make_linear(in_features: int, out_features: int, bias: bool, quant: QuantScheme | None,
                rotated_input: bool = False) -> nn.Module:
    """nn.Linear for an unquantized engine, else a QuantLinear of its scheme; `rotated_input`: the
    layer whose input the scheme's rotations turn online (down_proj)."""
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return QuantLinear(in_features, out_features, bias, quant, quant.rotate if rotated_input else 0)


def linear_input(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as `linear`'s weight expects it, for callers that pass the weight to a kernel themselves."""
    return linear.prepare(x) if isinstance(linear, QuantLinear) else x


def small_linear_args(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(weight, bias, extra gemv kwargs) of a linear layer for the fused small-batch kernel (whose
    input must first go through `linear_input`)."""
    if isinstance(linear, QuantLinear):
        return linear.qweight, linear.bias, {"w_scale": linear.wscale}
    return linear.weight, linear.bias, {}

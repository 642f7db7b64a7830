"""Triton kernels of the GPU path. Each has a torch reference (the CPU path) it is tested against;
CI runs them on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

`use_kernels(t)` is the one switch the model consults: True for CUDA tensors unless the
environment sets KILN_TRITON=0 (the torch references then run on the GPU too, for A/B timing and
for bisecting a numerical difference).
"""

from __future__ import annotations

import os

import torch


def use_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("KILN_TRITON", "1") != "0"

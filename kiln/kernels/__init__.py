"""Triton kernels of the GPU path. Each has a torch reference (the CPU path) it is tested against;
CI runs them on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""

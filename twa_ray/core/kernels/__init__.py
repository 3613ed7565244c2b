"""Compiled kernels of the packed projection: C (CPU) and Triton (CUDA)."""

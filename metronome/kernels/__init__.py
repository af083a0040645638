"""Kernels: the torch reference ops and the C++ build (block matmuls, the fused decoder, its thread pool)."""

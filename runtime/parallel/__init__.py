"""Tensor-parallel serving: the ranks' collective and the rank processes (docs/tensor_parallel.md)."""

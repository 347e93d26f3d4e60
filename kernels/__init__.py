"""Triton kernels for native sparse attention, each beside a readable PyTorch reference."""

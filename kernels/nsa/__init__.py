"""Native sparse attention operations: block pooling, selected-, compressed- and window attention.

Callers import from here, never from a submodule: today every name is the PyTorch reference in
`kernels.nsa.reference`; the kernel issue adds Triton kernels beside it and dispatches to them here
(CUDA, supported shapes and dtypes) behind the same signatures, keeping the reference as fallback.
"""

from kernels.nsa.reference import block_pool, compressed_attention, selected_attention, window_attention

__all__ = ["block_pool", "compressed_attention", "selected_attention", "window_attention"]

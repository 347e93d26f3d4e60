"""Native sparse attention operations: block pooling, selected-, compressed- and window attention.

Callers import from here, never from a submodule. Each name dispatches: on CUDA with Triton, the
kernels (`triton_selected` for selected and window attention, `sdpa_compressed` for the compressed
branch); everywhere else, or when forced, the PyTorch reference in `kernels.nsa.reference`, which
is also the oracle the kernel tests compare against. Force the reference with the environment
variable LSRM_NSA_REFERENCE=1 or, for a region of code, `with reference_only():`.
Tile mode (one block list per query tile, FlexAttention) is `kernels.nsa.flex_tiles.tile_attention`.
Lists that several calls read (every layer of a forward under 3D routing) go in as a `Selection`:
the kernels then build their walks from them once (`prepare` builds them ahead, e.g. to time it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from kernels.nsa import reference
from kernels.nsa.block_lists import Selection
from kernels.nsa.reference import block_pool

__all__ = [
    "Selection",
    "block_pool",
    "compressed_attention",
    "kernels_enabled",
    "prepare",
    "reference_only",
    "selected_attention",
    "window_attention",
]

_forced_reference = 0  # depth of active `reference_only` regions


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Run the PyTorch reference inside this region, whatever the device."""
    global _forced_reference
    _forced_reference += 1
    try:
        yield
    finally:
        _forced_reference -= 1


def kernels_enabled(x: torch.Tensor) -> bool:
    """Whether ops on tensors like x run the kernels: CUDA, Triton importable, and the reference not forced."""
    return (
        x.is_cuda and not _forced_reference and os.environ.get("LSRM_NSA_REFERENCE", "0") != "1" and _triton_installed()
    )


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: every NSA call of every block asks."""
    return importlib.util.find_spec("triton") is not None


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_offsets: torch.Tensor,
    selected: torch.Tensor | Selection,
    scale: float | None = None,
    *,
    chunk_size: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to the union of its selected blocks; see `reference.selected_attention`.

    selected: lists [Nq, Hkv, n], or a `Selection` of them reused across calls. chunk_size only
    bounds the reference's working set (the kernels need none).
    """
    if kernels_enabled(q):
        from kernels.nsa import triton_selected

        if triton_selected.supported(q, k):
            out, lse = triton_selected.selected_attention(q, k, v, block_offsets, selected, scale)
            return (out, lse) if return_lse else out
    lists = selected.blocks if isinstance(selected, Selection) else selected
    return reference.selected_attention(
        q, k, v, block_offsets, lists, scale, chunk_size=chunk_size, return_lse=return_lse
    )


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_offsets: torch.Tensor,
    query_block: torch.Tensor | Selection,
    scale: float | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Each query attends to the keys of one block (query_block [Nq], -1 = none): a one-entry selection.

    query_block may be that selection already (`Selection.window`), reused across calls.
    """
    if not isinstance(query_block, Selection):
        query_block = Selection.window(query_block, k.shape[1])
    return selected_attention(q, k, v, block_offsets, query_block, scale, chunk_size=chunk_size)


def prepare(selection: Selection, block_offsets: torch.Tensor, heads: int, head_dim: int) -> None:
    """Build now what the kernels derive from these lists for `heads` query heads of head_dim (no-op
    where the reference runs); later calls on `selection` with the same block_offsets reuse it."""
    if not kernels_enabled(selection.blocks):
        return
    from kernels.nsa import triton_selected

    offsets = block_offsets.to(device=selection.blocks.device, dtype=torch.long).contiguous()
    triton_selected.prepare(selection, offsets, heads // selection.blocks.shape[1], head_dim)


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    q_token_cu: torch.Tensor,
    block_cu: torch.Tensor,
    scale: float | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Each query attends to every compressed block of its object; see `reference.compressed_attention`."""
    if kernels_enabled(q) and q.dtype in (torch.float16, torch.bfloat16):
        from kernels.nsa import sdpa_compressed

        return sdpa_compressed.compressed_attention(q, k_cmp, v_cmp, q_token_cu, block_cu, scale)
    return reference.compressed_attention(q, k_cmp, v_cmp, q_token_cu, block_cu, scale, chunk_size=chunk_size)

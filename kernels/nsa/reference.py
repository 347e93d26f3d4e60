"""Readable PyTorch reference of the native sparse attention (NSA) branch operations.

These functions define what the NSA operations compute; the Triton kernels of the kernel issue
will live beside this module (e.g. `kernels/nsa/triton_*.py`) behind the same function signatures,
and `kernels.nsa` will dispatch to them where they apply, keeping these as the fallback on the CPU
and MPS and as the oracle the kernel tests compare against.

Token layout (shared with `backend.model.blocks`): packed variable-length tokens without padding.
Keys are sorted so that each spatial block is contiguous and objects are contiguous too.

- `block_offsets` [Bk + 1] int64: the tokens of block b are rows block_offsets[b]:block_offsets[b + 1].
- `block_cu` [B + 1] int64: the blocks of object i are block_cu[i]:block_cu[i + 1].
- `q_token_cu` [B + 1] int64: the query tokens of object i.
- Heads: q [Nq, Hq, D], k and v [Nk, Hkv, D]; query head h uses KV head h // (Hq // Hkv) (GQA).
- Selection lists are per KV head: `selected` [Nq, Hkv, n] int64 global block indices, -1 for an
  empty slot. A query attends to the union of its selected blocks, so repeated entries count once.

All attention math (scores, softmax, weighted sum) runs in float32 for float16/bfloat16 inputs
(float64 stays float64); the result is cast back to the dtype of q. Queries are processed in
chunks so that the paper's size (about 400K tokens, 16 selected blocks of up to 512 tokens) stays
within a fixed working set; when gradients are needed each chunk is recomputed in the backward
pass (activation checkpointing), so training memory stays bounded as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

# Float32 elements allowed in the largest per-chunk intermediate (gathered keys): 512 MiB.
_ELEMENT_BUDGET = 1 << 27


def block_pool(x: torch.Tensor, block_offsets: torch.Tensor) -> torch.Tensor:
    """Mean of x [N, ...] over each block: [Bk, ...]; an empty block gets zeros.

    Accumulates in at least float32 and returns x's dtype; differentiable with respect to x.
    """
    lengths = block_offsets[1:] - block_offsets[:-1]  # [Bk]
    num_blocks = lengths.shape[0]
    token_block = torch.repeat_interleave(torch.arange(num_blocks, device=x.device), lengths, output_size=x.shape[0])
    dtype = _math_dtype(x)
    sums = x.new_zeros((num_blocks, *x.shape[1:]), dtype=dtype).index_add(0, token_block, x.to(dtype))
    counts = lengths.clamp_min(1).to(dtype).view(-1, *([1] * (x.ndim - 1)))
    return (sums / counts).to(x.dtype)


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_offsets: torch.Tensor,
    selected: torch.Tensor,
    scale: float | None = None,
    *,
    chunk_size: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to the union of the tokens of its selected blocks: [Nq, Hq, D].

    q [Nq, Hq, D]; k, v [Nk, Hkv, D]; selected [Nq, Hkv, n] global block indices (-1 = empty).
    The softmax runs over all keys of all selected blocks together; a query (head) without any
    valid block, or whose blocks are all empty, gets zeros. `chunk_size` queries are processed at
    a time (default: as many as fit a fixed working-set budget). With `return_lse`, also the
    log-sum-exp of each query head's scaled scores, [Nq, Hq] in float32 at least (-inf without keys),
    which mixes branches by their softmax mass.
    """
    num_queries, q_heads, head_dim = _check_heads(q, k, v)
    kv_heads = k.shape[1]
    if selected.shape[:2] != (num_queries, kv_heads):
        raise ValueError(f"selected must be [Nq, Hkv, n] = [{num_queries}, {kv_heads}, n], got {tuple(selected.shape)}")
    scale = head_dim**-0.5 if scale is None else scale
    starts = block_offsets[:-1]
    lengths = block_offsets[1:] - block_offsets[:-1]  # [Bk]
    slots = selected.shape[2]
    if num_queries == 0 or slots == 0 or lengths.numel() == 0:
        out = torch.zeros_like(q)
        return (out, q.new_full(q.shape[:2], -math.inf, dtype=_math_dtype(q))) if return_lse else out
    max_len = int(lengths.max())
    selected = _distinct(selected)
    # Keys and values are small under GQA (Hkv heads): upcast them once rather than per chunk.
    k32, v32 = k.to(_math_dtype(k)), v.to(_math_dtype(v))
    per_query = kv_heads * slots * max_len * max(head_dim, q_heads // kv_heads)
    chunk = _chunk(chunk_size, per_query, num_queries)

    def attend_chunk(q_c: torch.Tensor, sel_c: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        count = q_c.shape[0]
        valid_block = sel_c >= 0  # [C, Hkv, n]
        safe = sel_c.clamp_min(0)
        length = torch.where(valid_block, lengths[safe], 0)
        offsets = torch.arange(max_len, device=q.device)
        key_valid = offsets < length[..., None]  # [C, Hkv, n, L]
        rows = torch.where(key_valid, starts[safe][..., None] + offsets, 0).flatten(2)  # [C, Hkv, n*L]
        heads = torch.arange(kv_heads, device=q.device)[None, :, None]
        k_sel, v_sel = k_all[rows, heads], v_all[rows, heads]  # [C, Hkv, n*L, D]
        q_grouped = q_c.to(_math_dtype(q_c)).view(count, kv_heads, -1, head_dim)  # [C, Hkv, G, D]
        out, lse = _attend(q_grouped, k_sel, v_sel, key_valid.flatten(2)[:, :, None, :], scale, with_lse=True)
        return out.reshape(count, q_heads, head_dim).to(q.dtype), lse.reshape(count, q_heads)

    recompute = chunk < num_queries
    pieces = [
        _maybe_checkpoint(recompute, attend_chunk, q[s : s + chunk], selected[s : s + chunk], k32, v32)
        for s in range(0, num_queries, chunk)
    ]
    out = torch.cat([piece[0] for piece in pieces])
    return (out, torch.cat([piece[1] for piece in pieces])) if return_lse else out


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
    """Each query attends to every compressed block of its own object: [Nq, Hq, D].

    q [Nq, Hq, D]; k_cmp, v_cmp [Bk, Hkv, D] (one key/value per block); q_token_cu and block_cu
    [B + 1]. A query whose object has no block gets zeros.
    """
    num_queries, q_heads, head_dim = _check_heads(q, k_cmp, v_cmp)
    kv_heads = k_cmp.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    q_bounds, b_bounds = q_token_cu.tolist(), block_cu.tolist()
    if len(q_bounds) != len(b_bounds) or q_bounds[0] != 0 or q_bounds[-1] != num_queries:
        raise ValueError("q_token_cu and block_cu must be [B + 1] with q_token_cu spanning all queries")

    def attend_chunk(q_c: torch.Tensor, k_obj: torch.Tensor, v_obj: torch.Tensor) -> torch.Tensor:
        count = q_c.shape[0]
        q_grouped = q_c.to(_math_dtype(q_c)).view(count, kv_heads, -1, head_dim)  # [C, Hkv, G, D]
        out = _attend(q_grouped, k_obj, v_obj, None, scale)  # keys shared by the chunk: [1, Hkv, Bi, D]
        return out.reshape(count, q_heads, head_dim).to(q.dtype)

    pieces = []
    for obj in range(len(q_bounds) - 1):
        q_start, q_end = q_bounds[obj], q_bounds[obj + 1]
        b_start, b_end = b_bounds[obj], b_bounds[obj + 1]
        if q_end == q_start:
            continue
        if b_end == b_start:
            pieces.append(torch.zeros_like(q[q_start:q_end]))  # no block to attend to
            continue
        k_obj = k_cmp[b_start:b_end].to(_math_dtype(k_cmp)).transpose(0, 1)[None]  # [1, Hkv, Bi, D]
        v_obj = v_cmp[b_start:b_end].to(_math_dtype(v_cmp)).transpose(0, 1)[None]
        per_query = q_heads * (b_end - b_start)
        chunk = _chunk(chunk_size, per_query, q_end - q_start)
        recompute = chunk < q_end - q_start
        for s in range(q_start, q_end, chunk):
            pieces.append(_maybe_checkpoint(recompute, attend_chunk, q[s : min(s + chunk, q_end)], k_obj, v_obj))
    if not pieces:
        return q.new_zeros(q.shape)
    return torch.cat(pieces)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_offsets: torch.Tensor,
    query_block: torch.Tensor,
    scale: float | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Each query attends to the keys of one block, usually its own (query_block [Nq]; -1 = none).

    The selected-block attention with a single-entry list, shared by every KV head.
    """
    return selected_attention(
        q, k, v, block_offsets, window_selection(query_block, k.shape[1]), scale, chunk_size=chunk_size
    )


def window_selection(query_block: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The window branch as a selection: query_block [Nq] -> [Nq, Hkv, 1], shared by the KV heads."""
    return query_block.view(-1, 1, 1).expand(-1, kv_heads, 1)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float,
    *,
    with_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32: q [C, Hkv, G, D], k and v [C or 1, Hkv, L, D] -> [C, Hkv, G, D].

    key_valid (broadcastable to [C, Hkv, G, L]) masks keys out; a row with no valid key returns zeros
    (and, `with_lse`, the log-sum-exp [C, Hkv, G] of its scores is -inf).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [C, Hkv, G, L]
    if key_valid is None:
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return (out, torch.logsumexp(scores, dim=-1)) if with_lse else out
    has_key = key_valid.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~key_valid, float("-inf"))
    # An all-masked row would give NaN (forward and backward): give it finite scores, zero it after.
    scores = torch.where(has_key, scores, 0.0)
    out = torch.matmul(torch.softmax(scores, dim=-1) * has_key, v)
    if not with_lse:
        return out
    return out, torch.logsumexp(scores, dim=-1).masked_fill(~has_key[..., 0], -math.inf)


def _distinct(selected: torch.Tensor) -> torch.Tensor:
    """The same block lists with repeated entries replaced by -1 (entries come out sorted)."""
    ordered = selected.sort(dim=-1).values
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return ordered.masked_fill(repeated, -1)


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [Nq, Hq, D] and k, v [Nk, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    num_queries, q_heads, head_dim = q.shape
    if k.shape[2] != head_dim or q_heads % k.shape[1] != 0:
        raise ValueError(f"query heads {q_heads} must be a multiple of KV heads {k.shape[1]} with equal head dims")
    return num_queries, q_heads, head_dim


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half types, float64 stays float64 (tests compare gradients in double)."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk(chunk_size: int | None, per_query_elements: int, num_queries: int) -> int:
    if chunk_size is None:
        chunk_size = _ELEMENT_BUDGET // max(per_query_elements, 1)
    return max(1, min(chunk_size, max(num_queries, 1)))


def _maybe_checkpoint(recompute: bool, fn: Callable[..., object], *args: torch.Tensor) -> object:
    """fn(*args); with `recompute`, its large intermediates are recomputed in the backward pass, not kept."""
    if recompute and torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)

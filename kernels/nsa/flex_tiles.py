"""Tile mode: one block list per tile of queries, through PyTorch's FlexAttention with a block mask.

When nearby queries share one list (spatial routing makes that natural), the selection is a block
sparsity pattern FlexAttention runs near dense efficiency, so we use it rather than a kernel of our own.
Keys come in fixed tiles of `kv_tile` tokens (FlexAttention's sparse block), queries in tiles of `q_tile`.

Compiled FlexAttention specialises on shapes: every (shape, grad mode) is one more compiled entry of
`flex_attention`. Past dynamo's recompile limit (8 by default) dynamo stops compiling and runs the
function eagerly, which for FlexAttention is its unfused path (the whole score matrix in memory).
v1's bench ran its 16/1 cases after the 64/4 cases had compiled 12 entries, which explains their
0.6 TFLOP/s and out-of-memory (the heads were not the cause). Our calls run under a higher limit.
"""

from __future__ import annotations

import torch
from torch.nn.attention import flex_attention as flex

from kernels.nsa.block_lists import tile_lists

_compiled = None
RECOMPILE_LIMIT = 256  # compiled shapes per process; each is a real kernel, never the unfused fallback


def tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tile_selected: torch.Tensor,
    scale: float | None = None,
    *,
    q_tile: int = 128,
    kv_tile: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to the key tiles its query tile selected: (out [Nq, Hq, D], lse [Nq, Hq] float32).

    q [Nq, Hq, D]; k, v [Nk, Hkv, D]; tile_selected [ceil(Nq / q_tile), Hkv, n] indices of key tiles
    (keys t*kv_tile .. t*kv_tile + kv_tile - 1), -1 empty, repeats counted once. Equivalent to
    `selected_attention` with blocks of kv_tile keys and every query given its tile's list.
    Compiled on CUDA (the first call per shape compiles); eager elsewhere.
    """
    num_queries, q_heads, _ = q.shape
    num_keys, kv_heads, _ = k.shape
    group = q_heads // kv_heads
    key_tiles = -(-num_keys // kv_tile)
    lists, counts = tile_lists(tile_selected, 1)  # distinct, ascending, packed: what a BlockMask holds
    width = key_tiles  # the mask's transpose needs room for every key tile
    indices = torch.zeros(*lists.shape[:2], width, dtype=torch.int32, device=q.device)
    used = min(width, lists.shape[2])
    indices[..., :used] = lists[..., :used].clamp_max(key_tiles - 1)
    # [Qt, Hkv, .] -> [1, Hq, Qt, .]: the KV head's list serves each of its query heads. With one KV
    # head the mask keeps one head, which FlexAttention broadcasts (Hq times less mask to build).
    repeat = group if kv_heads > 1 else 1
    indices = indices.permute(1, 0, 2).repeat_interleave(repeat, dim=0)[None].contiguous()
    counts = counts.T.repeat_interleave(repeat, dim=0)[None].contiguous()
    mask = flex.BlockMask.from_kv_blocks(
        torch.zeros_like(counts),  # no partial tiles: every listed tile is attended in full
        indices,
        counts,
        indices,
        BLOCK_SIZE=(q_tile, kv_tile),
        mask_mod=None if q.is_cuda else _tile_mask(lists, key_tiles, group, q_tile, kv_tile),
        seq_lengths=(num_queries, num_keys),
    )
    attend = compiled_flex if q.is_cuda else flex.flex_attention
    out, aux = attend(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        block_mask=mask,
        scale=scale,
        enable_gqa=group > 1,
        **_lse_request(),
    )
    lse = aux.lse if hasattr(aux, "lse") else aux
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def _tile_mask(lists: torch.Tensor, key_tiles: int, group: int, q_tile: int, kv_tile: int):
    """The mask as a mask_mod: eager FlexAttention (the CPU) ignores block sparsity and reads only this."""
    chosen = torch.zeros(lists.shape[1], lists.shape[0], key_tiles + 1, dtype=torch.bool, device=lists.device)
    columns = torch.where(lists < key_tiles, lists, key_tiles).long().permute(1, 0, 2)  # padding -> spare column
    chosen.scatter_(2, columns, True)

    def mask_mod(batch, head, q_index, kv_index):
        return chosen[head // group, q_index // q_tile, kv_index // kv_tile]

    return mask_mod


def _lse_request() -> dict:
    """Ask for the lse the way this torch wants it (return_aux since 2.9; return_lse before)."""
    if hasattr(flex, "AuxRequest"):
        return {"return_aux": flex.AuxRequest(lse=True)}
    return {"return_lse": True}


def compiled_flex(*args, **kwargs):
    """`flex_attention` compiled (once per shape), under a recompile limit that new shapes never reach."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex.flex_attention, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return _compiled(*args, **kwargs)

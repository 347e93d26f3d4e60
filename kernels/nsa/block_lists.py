"""Block lists in the shapes the selected-attention kernels read, built with torch ops on the GPU.

- `tile_lists`: per tile of T consecutive queries and KV head, the union of their selected blocks,
  distinct, ascending and packed at the front, with its length. T = 1 gives each query's own
  distinct list (the reference counts a repeated entry once, so the kernels must too).
- `block_queries`: the selection inverted (CSR): per KV head and block, the queries that chose it,
  ascending. The backward pass walks it to give every key block its dk/dv without atomics.
- `sharing`: a cheap estimate of how much neighbouring queries' lists overlap (decides T).
"""

from __future__ import annotations

import torch

_NONE = torch.iinfo(torch.int32).max  # sorts after every real block index


def tile_lists(selected: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """selected [Nq, Hkv, n] (-1 = empty) -> blocks [ceil(Nq / tile), Hkv, tile * n] int32, counts [.., Hkv] int32.

    blocks[t, h, :counts[t, h]] are the distinct blocks chosen by queries t*tile .. t*tile+tile-1 for
    KV head h, ascending; the rest of the row is padding the kernels never read.
    """
    num_queries, kv_heads, slots = selected.shape
    tiles = -(-num_queries // tile)
    lists = selected.to(torch.int32).masked_fill(selected < 0, _NONE)
    if tiles * tile != num_queries:
        lists = torch.cat([lists, lists.new_full((tiles * tile - num_queries, kv_heads, slots), _NONE)])
    lists = lists.view(tiles, tile, kv_heads, slots).transpose(1, 2).reshape(tiles, kv_heads, tile * slots)
    lists = lists.sort(dim=-1).values
    repeated = torch.zeros_like(lists, dtype=torch.bool)
    repeated[..., 1:] = lists[..., 1:] == lists[..., :-1]
    lists = lists.masked_fill(repeated, _NONE).sort(dim=-1).values  # distinct, packed at the front
    counts = (lists != _NONE).sum(dim=-1, dtype=torch.int32)
    return lists.contiguous(), counts.contiguous()


def block_queries(selected: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries of each (KV head, block): (pointers [Hkv * Bk + 1] int64, queries [P] int32).

    The queries of KV head h and block b are queries[pointers[h * Bk + b]:pointers[h * Bk + b + 1]],
    ascending and each once, however often the query listed the block.
    """
    num_queries, kv_heads, _ = selected.shape
    device = selected.device
    head = torch.arange(kv_heads, device=device).view(1, kv_heads, 1)
    key = torch.where(selected >= 0, head * num_blocks + selected, -1)  # [Nq, Hkv, n]
    key = key.sort(dim=-1).values
    repeated = torch.zeros_like(key, dtype=torch.bool)
    repeated[..., 1:] = key[..., 1:] == key[..., :-1]
    keep = (key >= 0) & ~repeated
    query = torch.arange(num_queries, device=device, dtype=torch.int32).view(-1, 1, 1).expand_as(key)
    key, query = key[keep], query[keep]  # row-major order: queries already ascending
    order = torch.sort(key, stable=True).indices  # stable: keeps queries ascending inside a block
    counts = torch.bincount(key, minlength=kv_heads * num_blocks)
    pointers = torch.zeros(kv_heads * num_blocks + 1, dtype=torch.long, device=device)
    pointers[1:] = counts.cumsum(0)
    return pointers, query[order].contiguous()


def sharing(selected: torch.Tensor, tile: int, sample_tiles: int = 256) -> float:
    """Union size over the tile's total list length, on an evenly spread sample of tiles (1 = nothing shared).

    A tile whose T queries chose the same n blocks scores 1/T; unrelated random lists score about 1.
    """
    num_queries = selected.shape[0]
    tiles = num_queries // tile
    if tiles == 0:
        return 1.0
    picks = torch.linspace(0, tiles - 1, min(tiles, sample_tiles), device=selected.device).long()
    rows = (picks[:, None] * tile + torch.arange(tile, device=selected.device)).flatten()
    sample = selected[rows]
    _, union = tile_lists(sample, tile)
    listed = (tile_lists(sample, 1)[1]).sum()
    return float(union.sum() / listed.clamp_min(1))

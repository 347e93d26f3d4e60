"""Block lists in the shapes the selected-attention kernels read, built with torch ops on the GPU.

- `tile_lists`: per tile of T consecutive queries and KV head, the union of their selected blocks,
  distinct, ascending and packed at the front, with its length. T = 1 gives each query's own
  distinct list (the reference counts a repeated entry once, so the kernels must too).
- `block_queries`: the selection inverted (CSR): per KV head and block, the queries that chose it,
  ascending. The backward pass walks it to give every key block its dk/dv without atomics.
- `sharing`: a cheap estimate of how much neighbouring queries' lists overlap (decides T).
- `key_steps`: the walk of the forward and dq kernels: each program's union laid out as a stream of
  key lanes cut into steps of `step` lanes (`STEP`). Unpacked, every block starts a fresh step (a
  block costs ceil(size / step) steps, as in v1); packed, blocks follow one another in the stream,
  so the keys of several small blocks share one step (at most `WINDOW` blocks a step).
- `Selection`: lists that several calls read (every layer of a forward under 3D routing), carrying
  what the kernels derived from them, so the sorts and host syncs above run once, not per call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from kernels.nsa.reference import window_selection

_Derived = TypeVar("_Derived")

_NONE = torch.iinfo(torch.int32).max  # sorts after every real block index


@dataclass(eq=False)
class Selection:
    """Block lists blocks [Nq, Hkv, n] (-1 = empty) that stay fixed across calls, and what was derived from them.

    The NSA ops take a Selection wherever they take lists. Kernels derive their walks from the lists
    (tile choice, `key_steps`, `block_queries`: sorts and host syncs) through `derived`, which builds
    each thing on first use and keeps it, so every later call with the same object reuses it. The
    lists must not change in place while the object is in use.
    """

    blocks: torch.Tensor
    _derived: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def window(cls, query_block: torch.Tensor, kv_heads: int) -> Selection:
        """The window branch's one-entry lists: each query's own block (query_block [Nq], -1 = none)."""
        return cls(window_selection(query_block, kv_heads))

    def derived(self, key: Hashable, build: Callable[[], _Derived]) -> _Derived:
        """build(), computed on the first call with this key and returned from then on."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]


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


STEP = 64  # key lanes per kernel step
# Most blocks one packed step may touch: a packed block takes at least ceil(step / (WINDOW - 1)) lanes,
# so any `step` consecutive lanes touch at most WINDOW blocks.
WINDOW = 8
PACK_GAIN = 0.85  # pack when that needs under this fraction of the unpacked steps


@dataclass
class KeySteps:
    """Per program (tile of queries, KV head) p: its union's non-empty blocks as entries, and its steps.

    Entry e of program p (e < counts[p]) covers stream lanes [start[p, e], start[p, e] + size[p, e]),
    holding keys start + shift .. ; members[p, e] has bit t set when the tile's query t chose the block.
    Step i (i < steps[p]) covers lanes [i * step, (i + 1) * step); first[p, i] is the entry holding its first lane.
    """

    start: torch.Tensor  # [P, width] int32, ascending; padding entries hold 2**31 - 1
    shift: torch.Tensor  # [P, width] int32: key row = lane + shift
    size: torch.Tensor  # [P, width] int32
    members: torch.Tensor  # [P, width] int32 bit sets (all ones when tile = 1)
    counts: torch.Tensor  # [P] int32
    first: torch.Tensor  # [P, max_steps] int32
    steps: torch.Tensor  # [P] int32
    packed: bool
    direct: bool = False  # unpacked with every block within one step: step i is entry i (no `first` to read)

    @property
    def window(self) -> int:
        return WINDOW if self.packed else 1

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.start, self.shift, self.size, self.members, self.counts, self.first, self.steps


def key_steps(
    selected: torch.Tensor, offsets: torch.Tensor, tile: int, *, pack: bool | None = None, step: int = STEP
) -> KeySteps:
    """The step walk of `selected` [Nq, Hkv, n] over blocks `offsets` [Bk + 1], tiles of `tile` queries, `step` lanes.

    pack None: pack when that needs under `PACK_GAIN` of the unpacked steps (a packed step costs a little more).
    """
    blocks, _ = tile_lists(selected, tile)  # [tiles, Hkv, width]
    tiles, kv_heads, _ = blocks.shape
    num_blocks = offsets.numel() - 1
    # One spare empty block at index num_blocks stands for padding entries: no guards below.
    sizes = torch.cat([offsets[1:] - offsets[:-1], offsets.new_zeros(1)]).to(torch.int32)
    first_keys = torch.cat([offsets[:-1], offsets.new_zeros(1)])
    size = sizes[blocks.clamp_max(num_blocks).long()]
    blocks = blocks.masked_fill(size == 0, _NONE).sort(dim=-1).values  # empty blocks would only take window places
    index = blocks.clamp_max(num_blocks).long()
    size, real = sizes[index], blocks != _NONE
    counts = real.sum(dim=-1, dtype=torch.int32)
    full_lanes = -(-size // step) * step  # unpacked: every block starts a step
    packed_lanes = torch.where(real, size.clamp_min(-(-step // (WINDOW - 1))), 0)
    if pack is None:
        pack = bool(-(-packed_lanes.sum(-1) // step).sum() < PACK_GAIN * (full_lanes.sum() // step))
    lanes = packed_lanes if pack else full_lanes
    start = lanes.cumsum(dim=-1, dtype=torch.int64) - lanes
    steps = -(-lanes.sum(dim=-1, dtype=torch.int64) // step)
    max_steps = int(steps.max()) if steps.numel() else 0
    start = start.masked_fill(~real, _NONE)
    lane = torch.arange(max_steps, device=blocks.device, dtype=torch.int64) * step
    first = torch.searchsorted(start, lane.expand(tiles, kv_heads, max_steps).contiguous(), right=True) - 1
    first = first.clamp(min=0)
    shift = torch.where(real, first_keys[index] - start, 0)
    members = _members(selected, blocks, tile)
    return KeySteps(
        start=start.to(torch.int32).flatten(0, 1).contiguous(),
        shift=shift.to(torch.int32).flatten(0, 1).contiguous(),
        size=size.to(torch.int32).flatten(0, 1).contiguous(),
        members=members.flatten(0, 1).contiguous(),
        counts=counts.flatten().contiguous(),
        first=first.to(torch.int32).flatten(0, 1).contiguous(),
        steps=steps.to(torch.int32).flatten().contiguous(),
        packed=pack,
        direct=not pack and bool((size <= step).all()),
    )


def _members(selected: torch.Tensor, blocks: torch.Tensor, tile: int) -> torch.Tensor:
    """[tiles, Hkv, width] int32: bit t of entry e set when query t of the tile chose blocks[.., e]."""
    if tile == 1:
        return torch.ones_like(blocks)
    num_queries, kv_heads, slots = selected.shape
    tiles, _, width = blocks.shape
    chosen = torch.cat([selected, selected.new_full((tiles * tile - num_queries, kv_heads, slots), -1)])
    chosen = (
        chosen.to(torch.int32).view(tiles, tile, kv_heads, slots).transpose(1, 2).reshape(tiles, kv_heads, tile * slots)
    )
    bit = (1 << torch.arange(tile, device=blocks.device, dtype=torch.int32)).repeat_interleave(slots)
    # Each (query, block) once: sort each query's slots and drop repeats.
    per_query = chosen.view(tiles, kv_heads, tile, slots).sort(dim=-1).values
    repeated = torch.zeros_like(per_query, dtype=torch.bool)
    repeated[..., 1:] = per_query[..., 1:] == per_query[..., :-1]
    chosen = per_query.masked_fill(repeated, -1).view(tiles, kv_heads, tile * slots)
    position = torch.searchsorted(blocks, chosen.masked_fill(chosen < 0, _NONE)).clamp_max(width - 1)
    found = (chosen >= 0) & (blocks.gather(-1, position) == chosen)
    members = torch.zeros(tiles, kv_heads, width + 1, dtype=torch.int32, device=blocks.device)
    members.scatter_add_(-1, torch.where(found, position, width).long(), torch.where(found, bit, 0))
    return members[..., :width]

"""Block-aware sequence parallelism for stage 2 (LSRM §3.5, DESIGN §6).

Stage 2's packed tokens (volume and image, each in block order: `backend.model.sparse.SparseLayout`)
are split over the ranks of a process group so that:

- spatial blocks never straddle ranks: each rank holds a contiguous run of whole blocks of each token
  set, chosen so that the ranks hold about the same number of tokens (`balanced_bounds`);
- tokens may arrive in any contiguous split (an even split that cuts blocks, or each rank's own
  objects): one all-to-all before the first block moves them to their block-aligned ranks
  (`SequenceShard.to_blocks`) and the inverse all-to-all after the last block sends them back
  (`SequenceShard.from_blocks`);
- each rank computes the queries it holds; block compression runs on its own whole blocks; before the
  selected, window and compressed branches the keys/values of every rank (small under GQA) and the
  compressed keys/values are all-gathered, and the backward pass of that all-gather is a
  reduce-scatter of their gradients.

Every rank of the group holds the same `SparseLayout` (integer metadata and the routing, computed from
the same batch; `broadcast_rows` makes its inputs agree to the bit); only the token features are split.
Each rank's parameter gradients are its share of the whole: add them over the group (`sum_gradients`)
before the optimiser step. The collectives work on any process group (NCCL on GPUs, gloo on the CPU).
Training (`train --sequence-parallel N`) runs stage 2 this way through `LSRM.forward(..., group)`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.distributed as dist
from torch import nn

from backend.model.blocks import TokenBlocks
from backend.model.sparse import SparseBlock, SparseLayout


def balanced_bounds(block_offsets: Sequence[int], ranks: int) -> list[int]:
    """Token bounds [ranks + 1] that give each rank a contiguous run of whole blocks, balanced by tokens.

    Cut k goes to the block boundary nearest k / ranks of the tokens (never before cut k - 1), so no
    rank is more than half the largest block away from an even share at either end.
    """
    total, last = block_offsets[-1], len(block_offsets) - 1
    bounds = [0]
    for k in range(1, ranks):
        target = total * k / ranks
        after = min(bisect_left(block_offsets, target), last)  # the first boundary at or past the target
        before = max(after - 1, 0)
        nearest = after if block_offsets[after] - target <= target - block_offsets[before] else before
        bounds.append(max(bounds[-1], block_offsets[nearest]))
    return [*bounds, total]


def even_bounds(count: int, ranks: int) -> list[int]:
    """Token bounds [ranks + 1] of an even split of `count` rows that ignores blocks."""
    return [count * k // ranks for k in range(ranks + 1)]


def overlaps(sources: Sequence[int], targets: Sequence[int], rank: int) -> tuple[list[int], list[int]]:
    """Rows this rank sends to each rank and receives from each rank when rows move from `sources` to
    `targets` bounds (both contiguous splits of the same rows)."""

    def common(a: int, b: int) -> int:  # rows of source range a in target range b
        return max(0, min(sources[a + 1], targets[b + 1]) - max(sources[a], targets[b]))

    ranks = range(len(sources) - 1)
    return [common(rank, other) for other in ranks], [common(other, rank) for other in ranks]


@dataclass
class TokenShard:
    """One token set (volume or image) split over a group: this rank's whole blocks and how to gather keys."""

    group: dist.ProcessGroup | None
    rank: int
    token_bounds: list[int]  # [ranks + 1] rank r holds block-order rows token_bounds[r]:[r + 1]
    block_bounds: list[int]  # [ranks + 1] and the blocks block_bounds[r]:[r + 1]
    source_bounds: list[int]  # [ranks + 1] the rows each rank holds before `to_blocks` and after `from_blocks`
    local_offsets: torch.Tensor  # [b + 1] offsets of this rank's blocks within its rows (block compression)
    query_cu: torch.Tensor  # [B + 1] this rank's rows of each object (its queries)

    @classmethod
    def of(
        cls, blocks: TokenBlocks, group: dist.ProcessGroup | None = None, source_bounds: Sequence[int] | None = None
    ) -> TokenShard:
        """This rank's shard of `blocks`; tokens arrive in `source_bounds` (default: an even split)."""
        rank, ranks = dist.get_rank(group), dist.get_world_size(group)
        offsets = blocks.block_offsets.tolist()
        token_bounds = balanced_bounds(offsets, ranks)
        block_bounds = [bisect_left(offsets, bound) for bound in token_bounds]
        count = offsets[-1]
        source_bounds = even_bounds(count, ranks) if source_bounds is None else list(source_bounds)
        if len(source_bounds) != ranks + 1 or source_bounds[0] != 0 or source_bounds[-1] != count:
            raise ValueError(f"source bounds must be [{ranks + 1}] from 0 to {count}, got {source_bounds}")
        start, end = token_bounds[rank], token_bounds[rank + 1]
        first, last = block_bounds[rank], block_bounds[rank + 1]
        return cls(
            group=group,
            rank=rank,
            token_bounds=token_bounds,
            block_bounds=block_bounds,
            source_bounds=source_bounds,
            local_offsets=blocks.block_offsets[first : last + 1] - start,
            query_cu=blocks.token_cu.clamp(start, end) - start,
        )

    @property
    def rows(self) -> slice:
        """This rank's rows of the block order."""
        return slice(self.token_bounds[self.rank], self.token_bounds[self.rank + 1])

    @property
    def source_rows(self) -> slice:
        """The block-order rows this rank holds before `to_blocks` and after `from_blocks`."""
        return slice(self.source_bounds[self.rank], self.source_bounds[self.rank + 1])

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's source rows [n, ...] -> its whole blocks' rows (the all-to-all before the first block)."""
        send, receive = overlaps(self.source_bounds, self.token_bounds, self.rank)
        return _Exchange.apply(x, send, receive, self.group)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_blocks` (the all-to-all after the last block)."""
        send, receive = overlaps(self.token_bounds, self.source_bounds, self.rank)
        return _Exchange.apply(x, send, receive, self.group)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows [n, ...] -> every rank's rows [N, ...] in block order."""
        return _GatherRows.apply(x, _counts(self.token_bounds), self.group)

    def gather_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """One row per block of this rank [b, ...] -> one row per block of all ranks [Bk, ...]."""
        return _GatherRows.apply(x, _counts(self.block_bounds), self.group)


@dataclass
class SequenceShard:
    """Both token sets of a `SparseLayout` split over one process group."""

    volume: TokenShard
    image: TokenShard

    @classmethod
    def of(
        cls,
        layout: SparseLayout,
        group: dist.ProcessGroup | None = None,
        source_bounds: dict[str, Sequence[int]] | None = None,
    ) -> SequenceShard:
        """source_bounds: per set ("v", "i") the rows each rank holds on arrival (default: even splits)."""
        source_bounds = source_bounds or {}
        return cls(
            TokenShard.of(layout.volume, group, source_bounds.get("v")),
            TokenShard.of(layout.image, group, source_bounds.get("i")),
        )

    def __getitem__(self, name: str) -> TokenShard:
        return {"v": self.volume, "i": self.image}[name]

    def to_blocks(self, v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.volume.to_blocks(v), self.image.to_blocks(i)

    def from_blocks(self, v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.volume.from_blocks(v), self.image.from_blocks(i)


def run_sparse_blocks(
    blocks: Iterable[SparseBlock],
    v: torch.Tensor,
    i: torch.Tensor,
    layout: SparseLayout,
    shard: SequenceShard,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's blocks on this rank's source rows of v [n_v, C] and i [n_i, C]: balance, run, send back."""
    v, i = shard.to_blocks(v, i)
    for block in blocks:
        v, i = block(v, i, layout, shard)
    return shard.from_blocks(v, i)


def sum_gradients(parameters: Iterable[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Add each parameter's gradient over the group: every rank held a share of the tokens.

    (Under DDP over the same ranks, which averages, multiply the loss by the group size instead.)
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective rather than one per parameter
    dist.all_reduce(flat, group=group)
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(summed.view_as(grad))


def sequence_group(size: int) -> dist.ProcessGroup | None:
    """This rank's group of `size` consecutive ranks (ranks 0..size-1, size..2*size-1, ...), or None for size 1.

    Every rank creates every group (torch.distributed needs that), in the same order."""
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"{world} ranks do not split into sequence-parallel groups of {size}")
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
    return groups[rank // size]


def broadcast_rows(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, device: torch.device
) -> list[torch.Tensor]:
    """The group's first rank's tensors, on every rank of the group; any may differ in its first dimension.

    What decides the layout (informative voxels, patches, their points) is computed by every rank of a group from
    the same batch, but two GPUs may round it differently, and one voxel more on one rank would mismatch the
    collectives. So the first rank's copy is the one all use. `device` carries them (CUDA under NCCL); each comes
    back on the device it was on."""
    source = dist.get_global_rank(group, 0) if group is not None else 0
    first = dist.get_rank(group) == 0
    lengths = torch.tensor([len(t) for t in tensors], device=device)
    dist.broadcast(lengths, source, group=group)
    agreed = []
    for tensor, length in zip(tensors, lengths.tolist(), strict=True):
        shape = (length, *tensor.shape[1:])
        buffer = tensor.to(device).contiguous() if first else tensor.new_empty(shape, device=device)
        if buffer.numel():
            dist.broadcast(buffer, source, group=group)
        agreed.append(buffer.to(tensor.device))
    return agreed


def _counts(bounds: Sequence[int]) -> list[int]:
    return [b - a for a, b in pairwise(bounds)]


class _Exchange(torch.autograd.Function):
    """All-to-all of rows with per-rank counts; its gradient is the all-to-all the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup | None):
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _exchange(x, send, receive, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    if x.shape[0] != sum(send):
        raise ValueError(f"this rank holds {x.shape[0]} rows but the split says {sum(send)}")
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of different lengths (padded to the longest on the wire).

    The backward pass is a reduce-scatter: every rank's rows were read by every rank, so their gradient
    is the sum of what all ranks sent back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None):
        rank = dist.get_rank(group)
        if x.shape[0] != counts[rank]:
            raise ValueError(f"rank {rank} holds {x.shape[0]} rows but the split says {counts[rank]}")
        ctx.counts, ctx.group, ctx.rank = counts, group, rank
        width = max(counts)
        if width == 0:
            return x.clone()
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = x.new_empty((len(counts), width, *x.shape[1:]))
        dist.all_gather(list(gathered.unbind(0)), padded, group=group)
        return torch.cat([gathered[r, :count] for r, count in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        counts, width = ctx.counts, max(ctx.counts)
        if width == 0:
            return grad.clone(), None, None
        padded = grad.new_zeros((len(counts), width, *grad.shape[1:]))
        for r, piece in enumerate(grad.split(counts)):
            padded[r, : piece.shape[0]] = piece
        mine = grad.new_empty((width, *grad.shape[1:]))
        dist.reduce_scatter(mine, list(padded.unbind(0)), group=ctx.group)
        return mine[: counts[ctx.rank]], None, None

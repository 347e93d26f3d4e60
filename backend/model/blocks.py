"""Spatial block partitioning of sparse tokens for native sparse attention (LSRM §3.3).

A plain 1D split of the token sequence would tear spatial neighbourhoods apart, so tokens are
grouped by their integer coordinates: image patches by (view, row, col) into 2D blocks of b x b
patches of one view, voxels by (x, y, z) into 3D blocks of b^3 voxels. After the removal of
uninformative tokens every block holds a variable number of tokens. The tokens are then sorted so
that each object's tokens are contiguous and, inside it, each block's tokens are contiguous, which
is the packed layout `kernels.nsa` works on (see its docstring for the offsets' conventions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kernels.nsa import block_pool


@dataclass
class TokenBlocks:
    """Where every token went when sorted into spatial blocks, and where the blocks are."""

    order: torch.Tensor  # [N] int64: sorted = original[order]
    block_offsets: torch.Tensor  # [Bk + 1] int64: tokens of block b are sorted rows block_offsets[b]:[b + 1]
    block_cu: torch.Tensor  # [B + 1] int64: blocks of object i are block_cu[i]:block_cu[i + 1]
    token_cu: torch.Tensor  # [B + 1] int64: sorted tokens of object i are token_cu[i]:token_cu[i + 1]
    block_coords: torch.Tensor  # [Bk, d] int64: coords // block_size of each block (leading dims e.g. view)
    block_object: torch.Tensor  # [Bk] int64: the object each block belongs to
    token_block: torch.Tensor  # [N] int64: the block of each sorted token
    inverse: torch.Tensor = field(init=False)  # [N] int64: original = sorted[inverse]

    def __post_init__(self) -> None:
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(self.order.numel(), device=self.order.device)

    @property
    def num_blocks(self) -> int:
        return self.block_offsets.numel() - 1

    @property
    def num_objects(self) -> int:
        return self.block_cu.numel() - 1

    @property
    def block_sizes(self) -> torch.Tensor:
        """Tokens per block, [Bk]."""
        return self.block_offsets[1:] - self.block_offsets[:-1]

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x [N, ...] from the original order into block order."""
        return x.index_select(0, self.order)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x [N, ...] from block order back into the original order (inverse of `sort`)."""
        return x.index_select(0, self.inverse)

    def centres(self, token_xyz_sorted: torch.Tensor) -> torch.Tensor:
        """Mean 3D position [Bk, 3] of each block's tokens, from their positions in block order [N, 3]."""
        return block_pool(token_xyz_sorted, self.block_offsets)

    def to(self, device: torch.device | str) -> TokenBlocks:
        return TokenBlocks(
            self.order.to(device),
            self.block_offsets.to(device),
            self.block_cu.to(device),
            self.token_cu.to(device),
            self.block_coords.to(device),
            self.block_object.to(device),
            self.token_block.to(device),
        )


def partition(
    coords: torch.Tensor,
    block_size: Sequence[int],
    object_index: torch.Tensor | None = None,
    *,
    num_objects: int | None = None,
) -> TokenBlocks:
    """Group tokens into spatial blocks and sort them block by block.

    coords [N, d] int64: integer coordinates of each token, e.g. (view, row, col) of an image patch
    or (x, y, z) of a voxel. block_size: d block extents, 1 for a discrete dimension such as the
    view, e.g. (1, b, b) for images and (b, b, b) for volumes; the block coordinate of a token is
    coords // block_size (floor division). object_index [N] int64: the object of each token (all 0
    when omitted); num_objects: the batch size B, when some trailing objects may have no token.

    The order is (object, block coordinates lexicographically, original index): deterministic, with
    tokens of one block kept in their original order.
    """
    if coords.ndim != 2 or coords.shape[1] != len(block_size):
        raise ValueError(f"coords must be [N, {len(block_size)}] for block size {tuple(block_size)}")
    if any(b < 1 for b in block_size):
        raise ValueError(f"block sizes must be positive, got {tuple(block_size)}")
    device = coords.device
    count = coords.shape[0]
    coords = coords.long()
    if object_index is None:
        object_index = torch.zeros(count, dtype=torch.long, device=device)
    object_index = object_index.long()
    if object_index.shape != (count,):
        raise ValueError(f"object_index must be [{count}], got {tuple(object_index.shape)}")
    if count and int(object_index.min()) < 0:
        raise ValueError("object indices must be non-negative")
    objects = int(object_index.max()) + 1 if count else 0
    num_objects = objects if num_objects is None else num_objects
    if num_objects < objects:
        raise ValueError(f"num_objects={num_objects} but object index {objects - 1} occurs")

    block_coords = torch.div(coords, torch.tensor(block_size, device=device), rounding_mode="floor")
    keys = torch.cat([object_index[:, None], block_coords], dim=1)  # [N, 1 + d]
    # Lexicographic sort as stable sorts from the least to the most significant key; stability
    # keeps the original index as the final tie-break.
    order = torch.arange(count, device=device)
    for column in reversed(range(keys.shape[1])):
        order = order[torch.sort(keys[order, column], stable=True).indices]
    sorted_keys = keys[order]

    starts_block = torch.ones(count, dtype=torch.bool, device=device)
    if count:
        starts_block[1:] = (sorted_keys[1:] != sorted_keys[:-1]).any(dim=1)
    token_block = torch.cumsum(starts_block.long(), dim=0) - 1  # [N]
    first_token = starts_block.nonzero().flatten()  # [Bk]
    block_offsets = torch.cat([first_token, torch.tensor([count], device=device)])
    block_object = sorted_keys[first_token, 0]
    block_cu = _cumulative(torch.bincount(block_object, minlength=num_objects))
    token_cu = _cumulative(torch.bincount(object_index, minlength=num_objects))
    return TokenBlocks(
        order=order,
        block_offsets=block_offsets,
        block_cu=block_cu,
        token_cu=token_cu,
        block_coords=sorted_keys[first_token, 1:],
        block_object=block_object,
        token_block=token_block,
    )


def image_block_centres_px(blocks: TokenBlocks, block_size: int, patch_size: int) -> torch.Tensor:
    """2D centre (x, y) in pixels [Bk, 2] of each image block cell of b x b patches of p pixels.

    For blocks made by `partition` of (view, row, col) patch coordinates with block size (1, b, b).
    The cell's centre, not the mean of its active patches: routing asks which part of the image
    plane a block covers.
    """
    extent = float(block_size * patch_size)
    row, col = blocks.block_coords[:, 1], blocks.block_coords[:, 2]
    return torch.stack([(col.float() + 0.5) * extent, (row.float() + 0.5) * extent], dim=-1)


def _cumulative(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, dim=0)])

"""Spatial block partitioning: sort and unsort are exact inverses, blocks are contiguous and sane."""

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.model.blocks import TokenBlocks, image_block_centres_px, partition

relaxed = settings(deadline=None, max_examples=60)


@st.composite
def token_sets(draw) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor, int]:
    """Random integer coordinates (with repeats), block sizes and object indices."""
    dims = draw(st.integers(1, 4))
    count = draw(st.integers(0, 80))
    objects = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, draw(st.integers(1, 20)), (count, dims), generator=generator)
    block_size = tuple(draw(st.integers(1, 6)) for _ in range(dims))
    object_index = torch.randint(0, objects, (count,), generator=generator)
    return coords, block_size, object_index, objects


def check_layout(blocks: TokenBlocks, coords: torch.Tensor, block_size: tuple[int, ...], object_index: torch.Tensor):
    count = coords.shape[0]
    assert torch.equal(blocks.order.sort().values, torch.arange(count))  # a permutation
    sorted_coords = blocks.sort(coords)
    sorted_objects = blocks.sort(object_index)
    offsets = blocks.block_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == count
    assert all(a < b for a, b in itertools.pairwise(offsets))  # no empty block
    assert blocks.block_cu[0] == 0 and blocks.block_cu[-1] == blocks.num_blocks
    assert blocks.token_cu[0] == 0 and blocks.token_cu[-1] == count
    seen = set()
    for b in range(blocks.num_blocks):
        rows = slice(offsets[b], offsets[b + 1])
        expected = torch.div(sorted_coords[rows], torch.tensor(block_size), rounding_mode="floor")
        assert (expected == blocks.block_coords[b]).all()  # every token of the block maps to it
        assert (sorted_objects[rows] == blocks.block_object[b]).all()  # a block never spans objects
        assert (blocks.token_block[rows] == b).all()
        assert torch.equal(blocks.order[rows], blocks.order[rows].sort().values)  # original order inside
        key = (int(blocks.block_object[b]), *blocks.block_coords[b].tolist())
        assert key not in seen  # each spatial block appears once: it is contiguous
        seen.add(key)
    keys = [(int(blocks.block_object[b]), *blocks.block_coords[b].tolist()) for b in range(blocks.num_blocks)]
    assert keys == sorted(keys)  # (object, block coordinates) lexicographic
    for obj in range(blocks.num_objects):
        block_range = slice(int(blocks.block_cu[obj]), int(blocks.block_cu[obj + 1]))
        assert (blocks.block_object[block_range] == obj).all()
        token_range = slice(int(blocks.token_cu[obj]), int(blocks.token_cu[obj + 1]))
        assert (sorted_objects[token_range] == obj).all()
        # The object's tokens are exactly the tokens of its blocks.
        assert blocks.block_offsets[blocks.block_cu[obj]] == blocks.token_cu[obj]


@relaxed
@given(token_sets())
def test_partition_layout_and_exact_inverses(data) -> None:
    coords, block_size, object_index, objects = data
    blocks = partition(coords, block_size, object_index, num_objects=objects)
    check_layout(blocks, coords, block_size, object_index)
    features = torch.randn(coords.shape[0], 3, 2)
    assert torch.equal(blocks.unsort(blocks.sort(features)), features)
    assert torch.equal(blocks.sort(blocks.unsort(features)), features)
    assert blocks.num_objects == objects


@relaxed
@given(token_sets())
def test_partition_is_deterministic(data) -> None:
    coords, block_size, object_index, _ = data
    first, second = partition(coords, block_size, object_index), partition(coords.clone(), block_size, object_index)
    for name in ("order", "block_offsets", "block_cu", "token_cu", "block_coords", "block_object", "token_block"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_image_and_volume_blocks() -> None:
    # Two views of a 4 x 4 patch grid with a few patches pruned, 2 x 2 blocks per view.
    view, row, col = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    coords = torch.stack([view, row, col], dim=-1).reshape(-1, 3)
    keep = torch.ones(len(coords), dtype=torch.bool)
    keep[[0, 1, 4, 5]] = False  # the whole top-left block of view 0
    keep[[18]] = False
    coords = coords[keep]
    blocks = partition(coords, (1, 2, 2))
    assert blocks.num_blocks == 7
    # View 0 lost its block (0, 0, 0); view 1 lost one patch of its block (1, 0, 1).
    assert blocks.block_sizes.tolist() == [4, 4, 4, 4, 3, 4, 4]
    assert blocks.block_coords[0].tolist() == [0, 0, 1]
    centres = image_block_centres_px(blocks, block_size=2, patch_size=8)
    assert centres[0].tolist() == [24.0, 8.0]  # x from the block column, y from the block row

    voxels = torch.tensor([[0, 0, 0], [3, 3, 3], [1, 0, 1], [2, 0, 0]])
    volume = partition(voxels, (2, 2, 2))
    assert volume.block_offsets.tolist() == [0, 2, 3, 4]
    assert volume.sort(voxels).tolist() == [[0, 0, 0], [1, 0, 1], [2, 0, 0], [3, 3, 3]]
    xyz = volume.sort(voxels).float()
    assert volume.centres(xyz).tolist() == [[0.5, 0.0, 0.5], [2.0, 0.0, 0.0], [3.0, 3.0, 3.0]]


def test_empty_objects_keep_their_slots() -> None:
    coords = torch.tensor([[0], [5], [1]])
    blocks = partition(coords, (4,), torch.tensor([2, 0, 2]), num_objects=4)
    assert blocks.token_cu.tolist() == [0, 1, 1, 3, 3]
    assert blocks.block_cu.tolist() == [0, 1, 1, 2, 2]
    assert blocks.sort(coords).flatten().tolist() == [5, 0, 1]

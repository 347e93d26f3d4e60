"""Block routing against brute-force searches: score-based, to volume blocks, to image blocks."""

import math

import pytest
import torch

from backend.cameras import Cameras, project
from backend.model.blocks import image_block_centres_px, partition
from backend.model.routing import per_kv_head, route_to_image, route_to_volume, score_routing


def look_at_cameras(generator: torch.Generator, views: int, radius: float, size: int) -> Cameras:
    """float64 OpenCV cameras on a sphere looking at the origin (+Z forward, Y down)."""
    c2w = torch.eye(4, dtype=torch.float64).repeat(views, 1, 1)
    for view in range(views):
        direction = torch.randn(3, generator=generator, dtype=torch.float64)
        eye = radius * direction / direction.norm()
        forward = -eye / eye.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        c2w[view, :3, :3] = torch.stack([right, down, forward], dim=1)
        c2w[view, :3, 3] = eye
    focal = size / (2 * math.tan(math.radians(25)))
    intrinsics = torch.tensor([[focal, focal, size / 2, size / 2]], dtype=torch.float64).repeat(views, 1)
    return Cameras(c2w, intrinsics, size, size)


def first_by(keys: list[tuple], count: int) -> list[int]:
    """The last elements (block ids) of the `count` smallest keys, padded with -1."""
    chosen = [key[-1] for key in sorted(keys)[:count]]
    return chosen + [-1] * (count - len(chosen))


def test_route_to_volume_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    voxels = torch.randint(0, 12, (300, 3), generator=generator)
    object_index = torch.randint(0, 3, (300,), generator=generator)
    object_index[object_index == 1] = 0  # object 1 has no volume token
    blocks = partition(voxels, (4, 4, 4), object_index, num_objects=3)
    centres = blocks.centres(
        blocks.sort(voxels).double() + torch.rand(300, 3, generator=generator, dtype=torch.float64)
    )
    q_token_cu = torch.tensor([0, 20, 25, 40])
    queries = torch.rand(40, 3, generator=generator, dtype=torch.float64) * 12
    top_n = 6
    selected = route_to_volume(queries, centres, q_token_cu, blocks.block_cu, top_n, chunk_size=7)
    for i in range(40):
        obj = int(torch.searchsorted(q_token_cu, i, right=True)) - 1
        own = range(int(blocks.block_cu[obj]), int(blocks.block_cu[obj + 1]))
        keys = [(float(((queries[i] - centres[b]) ** 2).sum()), b) for b in own]
        assert selected[i].tolist() == first_by(keys, top_n), i
    assert (selected[20:25] == -1).all()


def test_route_to_volume_breaks_ties_towards_the_lower_block() -> None:
    centres = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, 0, 0.5]])
    selected = route_to_volume(torch.zeros(1, 3), centres, torch.tensor([0, 1]), torch.tensor([0, 4]), 3)
    assert selected.tolist() == [[3, 0, 1]]
    assert per_kv_head(selected, 2).tolist() == [[[3, 0, 1], [3, 0, 1]]]


def make_image_tokens(generator: torch.Generator, objects: int, views: int, grid: int, block: int):
    """Image patches of several objects (some pruned) with random 3D points, partitioned into blocks."""
    view, row, col = torch.meshgrid(torch.arange(views), torch.arange(grid), torch.arange(grid), indexing="ij")
    patch = torch.stack([view, row, col], dim=-1).reshape(-1, 3)
    coords = patch.repeat(objects, 1)
    object_index = torch.arange(objects).repeat_interleave(len(patch))
    keep = torch.rand(len(coords), generator=generator) < 0.6
    coords, object_index = coords[keep], object_index[keep]
    blocks = partition(coords, (1, block, block), object_index, num_objects=objects)
    token_xyz = torch.rand(len(coords), 3, generator=generator, dtype=torch.float64) * 2 - 1
    return blocks, token_xyz


@pytest.mark.parametrize(("per_view", "top_n"), [(1, 3), (3, 4), (4, 40)])
def test_route_to_image_matches_brute_force(per_view: int, top_n: int) -> None:
    generator = torch.Generator().manual_seed(per_view)
    objects, views, grid, block, patch = 2, 4, 8, 2, 8
    blocks, token_xyz = make_image_tokens(generator, objects, views, grid, block)
    centres_px = image_block_centres_px(blocks, block, patch)
    # The cameras sit inside the points' reach, so some queries lie behind some cameras.
    cameras = [look_at_cameras(generator, views, radius=1.3, size=grid * patch) for _ in range(objects)]
    q_token_cu = torch.tensor([0, 30, 55])
    queries = torch.rand(55, 3, generator=generator, dtype=torch.float64) * 2.4 - 1.2
    selected = route_to_image(
        queries, token_xyz, blocks, centres_px, cameras, q_token_cu, per_view, top_n, chunk_size=8
    )
    behind = 0
    for i in range(55):
        obj = 0 if i < 30 else 1
        candidates = []
        for v in range(views):
            uv, depth = project(cameras[obj][v], queries[i][None])
            if depth.item() <= 0:
                behind += 1
                continue
            in_view = [
                b
                for b in range(int(blocks.block_cu[obj]), int(blocks.block_cu[obj + 1]))
                if blocks.block_coords[b, 0] == v
            ]
            near = [(float(((uv[0, 0] - centres_px[b]) ** 2).sum()), b) for b in in_view]
            candidates += first_by(near, per_view)
        keys = []
        for b in candidates:
            if b < 0:
                continue
            points = token_xyz[int(blocks.block_offsets[b]) : int(blocks.block_offsets[b + 1])]
            keys.append((float(((points - queries[i]) ** 2).sum(-1).min()), b))
        assert selected[i].tolist() == first_by(keys, top_n), i
    assert behind > 0  # the test covered the skipped views


def test_route_to_image_object_without_blocks() -> None:
    generator = torch.Generator().manual_seed(3)
    token_xyz = torch.rand(9, 3, generator=generator, dtype=torch.float64)
    # All tokens in one block of object 0, and a second object with cameras but no image token.
    empty = partition(torch.zeros(len(token_xyz), 3, dtype=torch.long), (1, 2, 2), num_objects=2)
    assert empty.block_cu.tolist() == [0, 1, 1]
    cameras = [look_at_cameras(generator, 2, radius=3.0, size=32)] * 2
    selected = route_to_image(
        torch.zeros(3, 3, dtype=torch.float64),
        token_xyz,
        empty,
        torch.full((1, 2), 16.0),
        cameras,
        torch.tensor([0, 1, 3]),
        per_view=2,
        top_n=2,
    )
    assert selected[0].tolist() == [0, -1] and (selected[1:] == -1).all()


@pytest.mark.parametrize(("heads", "kv_heads"), [(1, 1), (4, 2), (16, 1)])
def test_score_routing_matches_brute_force(heads: int, kv_heads: int) -> None:
    generator = torch.Generator().manual_seed(heads)
    dim, top_n = 8, 4
    block_cu = torch.tensor([0, 6, 6, 9])
    q_token_cu = torch.tensor([0, 10, 12, 20])
    q = torch.randn(20, heads, dim, generator=generator, dtype=torch.float64)
    k_cmp = torch.randn(9, kv_heads, dim, generator=generator, dtype=torch.float64)
    k_cmp[4] = k_cmp[1]  # an exact tie: block 1 must come before block 4
    scale = dim**-0.5
    selected = score_routing(q, k_cmp, q_token_cu, block_cu, top_n, chunk_size=3)
    group = heads // kv_heads
    for i in range(20):
        obj = int(torch.searchsorted(q_token_cu, i, right=True)) - 1
        own = list(range(int(block_cu[obj]), int(block_cu[obj + 1])))
        for kv in range(kv_heads * bool(own)):
            importance = dict.fromkeys(own, 0.0)
            for h in range(kv * group, (kv + 1) * group):
                logits = [float(q[i, h] @ k_cmp[b, kv]) * scale for b in own]
                top = max(logits)
                total = sum(math.exp(x - top) for x in logits)
                for b, x in zip(own, logits, strict=True):
                    importance[b] += math.exp(x - top) / total
            keys = [(-importance[b], b) for b in own]
            assert selected[i, kv].tolist() == first_by(keys, top_n), (i, kv)
    assert (selected[10:12] == -1).all()
    assert ((selected[12:] == -1).sum(-1) == 1).all()  # 3 blocks for 4 slots


def test_smallest_selects_like_a_stable_sort() -> None:
    """The topk selection keeps the stable sort's answer: ties to lower positions, -1 past the finite scores."""
    from backend.model.routing import _smallest

    generator = torch.Generator().manual_seed(3)
    score = torch.randint(0, 6, (200, 40), generator=generator).float()  # many ties
    score[torch.rand(score.shape, generator=generator) < 0.3] = float("inf")
    for count in (1, 5, 16, 40, 45):
        order = torch.sort(score, dim=-1, stable=True).indices[..., :count]
        want = torch.where(torch.isfinite(score.gather(-1, order)), order, -1)
        want = torch.cat([want, want.new_full((200, max(0, count - 40)), -1)], dim=-1)
        assert torch.equal(_smallest(score, count), want)


@pytest.mark.parametrize("chunk_size", [None, 100])
def test_route_to_volume_on_a_surface_matches_brute_force_in_float32(chunk_size: int | None) -> None:
    """Thousands of queries on a sphere shell (runs, bounding-box pruning, chunks by width) in float32,
    where rounding and exact ties decide: the full stable ranking of every block is the oracle."""
    generator = torch.Generator().manual_seed(7)
    direction = torch.randn(3000, 3, generator=generator)
    voxels = (direction / direction.norm(dim=-1, keepdim=True) * 20 + 24).round().long()  # shell of a 48^3 grid
    blocks = partition(voxels, (4, 4, 4))
    points = (blocks.sort(voxels).float() + 0.5) / 24 - 1
    centres = blocks.centres(points)
    queries = torch.cat([points, points[:50] * 1.7, torch.zeros(1, 3)])  # on the shell, far outside, the centre
    cu, top_n = torch.tensor([0, len(queries)]), 8
    selected = route_to_volume(queries, centres, cu, blocks.block_cu, top_n, chunk_size=chunk_size)
    distance = ((queries[:, None] - centres[None]) ** 2).sum(-1)
    want = torch.sort(distance, dim=-1, stable=True).indices[:, :top_n]
    assert torch.equal(selected, want)


def test_smallest_orders_signed_scores_and_odd_values() -> None:
    """Negative scores (score routing ranks -importance), -0.0 tying with 0.0, NaN never chosen, low precision."""
    from backend.model.routing import _smallest

    score = torch.tensor([[0.5, -0.0, 0.0, -2.0, float("nan"), 3.0]])
    assert _smallest(score, 7).tolist() == [[3, 1, 2, 0, 5, -1, -1]]
    generator = torch.Generator().manual_seed(4)
    score = torch.randn(64, 300, generator=generator).to(torch.bfloat16)  # many exact ties
    order = torch.sort(score.float(), dim=-1, stable=True).indices[:, :20]
    assert torch.equal(_smallest(score, 20), order)

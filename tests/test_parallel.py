"""Block-aware sequence parallelism: whole blocks per rank, and two gloo processes that match one process."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backend.model.config import CONFIGS
from backend.model.sparse import SparseBlock, SparseLayout, build_layout, route
from backend.parallel import (
    SequenceShard,
    balanced_bounds,
    even_bounds,
    overlaps,
    run_sparse_blocks,
    sum_gradients,
)
from tests.test_routing import look_at_cameras

CASES = {  # name: (routing, where the tokens arrive)
    "3d routing, even split": ("3d", "even"),
    "score routing, one object per rank": ("score", "objects"),
}


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_balanced_bounds_keep_blocks_whole_and_balance_tokens(ranks: int) -> None:
    generator = torch.Generator().manual_seed(ranks)
    sizes = torch.randint(1, 30, (40,), generator=generator)
    offsets = [0, *torch.cumsum(sizes, 0).tolist()]
    bounds = balanced_bounds(offsets, ranks)
    assert bounds[0] == 0 and bounds[-1] == offsets[-1] and bounds == sorted(bounds)
    assert set(bounds) <= set(offsets)  # every cut is a block boundary
    share = offsets[-1] / ranks
    for k in range(1, ranks):  # each cut is the boundary nearest its even share
        assert abs(bounds[k] - share * k) == min(abs(o - share * k) for o in offsets)


def test_balanced_bounds_with_fewer_blocks_than_ranks_leave_ranks_empty() -> None:
    assert balanced_bounds([0, 7, 9], 4) == [0, 0, 7, 7, 9]  # cuts at 2.25, 4.5, 6.75 tokens
    assert balanced_bounds([0], 3) == [0, 0, 0, 0]


def test_overlaps_move_every_row_exactly_once() -> None:
    sources, targets = [0, 10, 10, 25], [0, 4, 18, 25]
    sent = [overlaps(sources, targets, rank)[0] for rank in range(3)]
    received = [overlaps(sources, targets, rank)[1] for rank in range(3)]
    assert sent == [[4, 6, 0], [0, 0, 0], [0, 8, 7]]
    assert received == [list(column) for column in zip(*sent, strict=True)]
    assert even_bounds(25, 3) == [0, 8, 16, 25]


def test_two_gloo_ranks_give_the_outputs_and_gradients_of_one_process(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port on the loopback for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(2, port, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, case in report.items():
            assert case["rows"]["v"] > 0 and case["rows"]["i"] > 0, (rank, name)
            assert case["objects"] == 2 and case["uneven blocks"], (rank, name)
            for quantity, error in case["errors"].items():
                assert error < 1e-10, f"rank {rank}, {name}: {quantity} differs by {error}"
        assert report["3d routing, even split"]["source cuts a block"]  # the all-to-all had work to do


def _rank(rank: int, ranks: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    try:
        report = {name: _compare(routing, arrival) for name, (routing, arrival) in CASES.items()}
        (out / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _compare(routing: str, arrival: str) -> dict:
    """Run three sparse blocks in one process and split over the group; the largest relative differences."""
    blocks, layout, v, i = _problem(routing)
    weights = {"v": torch.randn_like(v), "i": torch.randn_like(i)}
    parameters = [p for block in blocks for p in block.parameters()]

    # One process: every token here.
    full = {"v": v.clone().requires_grad_(), "i": i.clone().requires_grad_()}
    out_v, out_i = full["v"], full["i"]
    for block in blocks:
        out_v, out_i = block(out_v, out_i, layout)
    ((out_v * weights["v"]).sum() + (out_i * weights["i"]).sum()).backward()
    reference = {"v": out_v.detach(), "i": out_i.detach()}
    reference_grads = [p.grad.clone() for p in parameters]
    for p in parameters:
        p.grad = None

    # The group: each rank starts with its source rows and adds its share of the loss.
    sources = (
        {"v": layout.volume.token_cu.tolist(), "i": layout.image.token_cu.tolist()} if arrival == "objects" else {}
    )
    shard = SequenceShard.of(layout, source_bounds=sources)
    rows = {s: shard[s].source_rows for s in "vi"}
    mine = {s: (v if s == "v" else i)[rows[s]].clone().requires_grad_() for s in "vi"}
    out = dict(zip("vi", run_sparse_blocks(blocks, mine["v"], mine["i"], layout, shard), strict=True))
    sum((out[s] * weights[s][rows[s]]).sum() for s in "vi").backward()
    sum_gradients(parameters)

    errors = {f"output {s}": _relative(out[s], reference[s][rows[s]]) for s in "vi"}
    errors.update({f"input gradient {s}": _relative(mine[s].grad, full[s].grad[rows[s]]) for s in "vi"})
    errors["parameter gradients"] = max(_relative(p.grad, g) for p, g in zip(parameters, reference_grads, strict=True))
    volume_offsets = layout.volume.block_offsets.tolist()
    return {
        "errors": errors,
        "rows": {s: shard[s].rows.stop - shard[s].rows.start for s in "vi"},
        "objects": layout.volume.num_objects,
        "uneven blocks": len(set(layout.volume.block_sizes.tolist())) > 1,
        "source cuts a block": not set(shard.volume.source_bounds) <= set(volume_offsets),
    }


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude (at least 1)."""
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1.0))


def _problem(routing: str) -> tuple[list[SparseBlock], SparseLayout, torch.Tensor, torch.Tensor]:
    """Three sparse blocks of the tiny config (float64, random weights) and two objects of different sizes:
    shell voxels and disc-shaped foreground patches, so blocks hold uneven numbers of tokens."""
    config = dataclasses.replace(CONFIGS["tiny"], routing=routing)
    generator = torch.Generator().manual_seed(3)
    grid = config.sparse_volume_tokens
    patches_per_side = config.sparse_image_size // config.patch_size
    coords = torch.cartesian_prod(*[torch.arange(grid)] * 3)
    pixels = torch.cartesian_prod(torch.arange(patches_per_side), torch.arange(patches_per_side))
    voxels, patches, points, cameras = [], [], [], []
    for radius in (5.5, 3.0):  # voxel units: a large and a small object
        distance = (coords.double() + 0.5 - grid / 2).norm(dim=-1)
        voxels.append(coords[(distance - radius).abs() < 1.0])
        views = []
        for view in range(3):
            centre = torch.rand(2, generator=generator) * 4 + patches_per_side / 2 - 2
            inside = (pixels.double() + 0.5 - centre).norm(dim=-1) < radius * (0.8 + 0.2 * view)
            views.append(torch.cat([torch.full((int(inside.sum()), 1), view), pixels[inside]], dim=1))
        patches.append(torch.cat(views))
        points.append((torch.rand(len(patches[-1]), 3, generator=generator, dtype=torch.float64) - 0.5) * radius / 8)
        cameras.append(look_at_cameras(generator, 3, 3.0, config.sparse_image_size))
    layout = build_layout(voxels, patches, points, config)
    if routing == "3d":
        route(layout, cameras, config)
    torch.manual_seed(4)
    blocks = [SparseBlock(config, last=index == 2).double() for index in range(3)]
    with torch.no_grad():
        for p in (p for block in blocks for p in block.parameters()):
            p.normal_(0.0, 0.2)  # no zero-initialised layer: every parameter gets a gradient
    v = torch.randn(len(layout.volume_voxels), config.hidden, dtype=torch.float64)
    i = torch.randn(len(layout.image_patches), config.hidden, dtype=torch.float64)
    return blocks, layout, v, i

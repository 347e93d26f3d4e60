"""Benchmark: stage 2 training steps with block-aware sequence parallelism on 1, 2 and 4 GPUs (issue 5).

    torchrun --standalone --nproc_per_node=4 bench/sequence_parallel.py [--config paper] [--views 16]
        [--res 768] [--blocks 2] [--sdf-threshold 1.0] [--sizes 1 2 4] [--steps 3] [--dtype bfloat16]
        [--out out/bench/sequence_parallel]

One launch measures every group size s of --sizes: the first s ranks form a group and run the same
long-context problem (the others wait). Size 1 is the plain stage on one GPU, without collectives.
The stage-2 tokens are those of one object: a sphere of radius 0.8 stands in for the stage-1 geometry
(its SDF picks the voxels, eq. 13; its exact masks the patches; its surface places the image tokens),
routed in 3D; features are random. A step is what training does with stage 2: tokens arrive in an
even split over the group, all-to-all to whole blocks, --blocks sparse blocks forward, all-to-all
back, a loss, backward, and the sum of the parameter gradients over the group. Per size: step time
(the slowest rank), tokens/s, scaling efficiency against size 1, the tokens each rank computes and
the peak memory of each rank. --sdf-threshold widens the band of voxels (more volume tokens).
Prints a table and writes JSON under --out. A benchmark, not a test: nothing here asserts a time.
On a machine without CUDA it runs on the CPU with gloo (e.g. --config tiny --views 4 --res 96).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # torchrun runs this file as a script: the repo's packages come from here

from backend.device import device_report  # noqa: E402
from backend.model.config import CONFIGS, ModelConfig  # noqa: E402
from backend.model.sparse import (  # noqa: E402
    SparseBlock,
    SparseLayout,
    build_layout,
    foreground_patches,
    informative_voxels,
    patch_points,
    route,
)
from backend.parallel import SequenceShard, run_sparse_blocks, sum_gradients  # noqa: E402
from bench.model_forward import Sphere, ring_cameras, sphere_masks, synchronise  # noqa: E402


def stage_two_problem(config: ModelConfig, views: int, device: torch.device) -> SparseLayout:
    """The packed, routed stage-2 tokens of one sphere seen by `views` cameras (the same on every rank)."""
    size, patch = config.sparse_image_size, config.patch_size
    cameras = ring_cameras(views, size, device)
    sphere = Sphere(device)
    voxels = informative_voxels(
        sphere, config.sparse_volume_tokens, config.sdf_threshold, config.sdf_subsamples, device
    )
    patches = foreground_patches(sphere_masks(cameras), patch).nonzero()
    points = patch_points(sphere, cameras, patches, patch)
    layout = build_layout([voxels], [patches], [points], config)
    route(layout, [cameras], config)
    return layout


def training_step(
    blocks: list[SparseBlock],
    layout: SparseLayout,
    features: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    shard: SequenceShard | None,
    group: dist.ProcessGroup | None,
    autocast: torch.autocast,
) -> None:
    """Forward and backward of the stage-2 blocks on this rank's tokens, then the gradient sum."""
    for block in blocks:
        block.zero_grad(set_to_none=True)
    rows = {s: slice(None) if shard is None else shard[s].source_rows for s in "vi"}
    v, i = (features[s][rows[s]].detach().requires_grad_() for s in "vi")
    with autocast:
        if shard is None:
            for block in blocks:
                v, i = block(v, i, layout)
        else:
            v, i = run_sparse_blocks(blocks, v, i, layout, shard)
        loss = (v.float() * weights["v"][rows["v"]]).sum() + (i.float() * weights["i"][rows["i"]]).sum()
    loss.backward()
    if shard is not None:
        sum_gradients((p for block in blocks for p in block.parameters()), group)


def measure(
    size: int,
    args: argparse.Namespace,
    config: ModelConfig,
    layout: SparseLayout,
    device: torch.device,
) -> dict | None:
    """Time --steps training steps on a group of the first `size` ranks; None on ranks outside it."""
    rank = dist.get_rank()
    group = dist.new_group(list(range(size))) if size > 1 else None  # every rank must create every group
    if rank >= size:
        return None
    torch.manual_seed(0)  # the same weights and features on every rank
    blocks = [SparseBlock(config, last=k == args.blocks - 1).to(device) for k in range(args.blocks)]
    counts = {"v": len(layout.volume_voxels), "i": len(layout.image_patches)}
    features = {s: torch.randn(n, config.hidden, device=device) for s, n in counts.items()}
    weights = {s: torch.randn(n, config.hidden, device=device) for s, n in counts.items()}
    shard = SequenceShard.of(layout, group) if size > 1 else None
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        training_step(blocks, layout, features, weights, shard, group, autocast)
    synchronise(device)
    begin = time.perf_counter()
    for _ in range(args.steps):
        training_step(blocks, layout, features, weights, shard, group, autocast)
    synchronise(device)
    seconds = torch.tensor([(time.perf_counter() - begin) / args.steps], device=device)
    if group is not None:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)  # the step waits for the slowest rank
    rows = {s: shard[s].rows.stop - shard[s].rows.start for s in "vi"} if shard else counts
    return {
        "gpus": size,
        "rank": rank,
        "step_s": float(seconds),
        "volume_tokens": rows["v"],
        "image_tokens": rows["i"],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper", choices=list(CONFIGS))
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--res", type=int, default=768, help="stage-2 image size")
    parser.add_argument("--blocks", type=int, default=2, help="stage-2 blocks per step (the paper has 24)")
    parser.add_argument("--sdf-threshold", type=float, default=None, help="eq. 13 band in voxels (config's default)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4], help="group sizes (GPUs) to measure")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=Path("out/bench/sequence_parallel"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [s for s in args.sizes if s <= world]
    config = dataclasses.replace(CONFIGS[args.config], sparse_image_size=args.res)
    if args.sdf_threshold is not None:
        config = dataclasses.replace(config, sdf_threshold=args.sdf_threshold)

    begin = time.perf_counter()
    layout = stage_two_problem(config, args.views, device)
    synchronise(device)
    setup_s = time.perf_counter() - begin
    records = []
    for size in sizes:
        record = measure(size, args, config, layout, device)
        everyone = [None] * world
        dist.all_gather_object(everyone, record)
        records.extend(r for r in everyone if r is not None)
        dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return

    tokens = len(layout.volume_voxels) + len(layout.image_patches)
    rows = []
    for size in sizes:
        mine = [r for r in records if r["gpus"] == size]
        step = mine[0]["step_s"]
        rows.append(
            {
                "gpus": size,
                "step_s": step,
                "tokens_per_s": tokens / step,
                "per_rank": mine,
            }
        )
    base = next((r["step_s"] for r in rows if r["gpus"] == 1), None)
    for row in rows:
        row["scaling_efficiency"] = base / (row["gpus"] * row["step_s"]) if base else None
    report = {
        "device": device_report(device),
        "world_size": world,
        "config": args.config,
        "views": args.views,
        "resolution": args.res,
        "blocks": args.blocks,
        "dtype": args.dtype,
        "volume_tokens": len(layout.volume_voxels),
        "image_tokens": len(layout.image_patches),
        "volume_blocks": layout.volume.num_blocks,
        "image_blocks": layout.image.num_blocks,
        "setup_s": setup_s,
        "steps": args.steps,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sequence_parallel.json"
    path.write_text(json.dumps(report, indent=2))
    print(
        f"{args.config} stage 2, {args.blocks} blocks, {args.views} views at {args.res}: "
        f"{report['volume_tokens']} volume + {report['image_tokens']} image tokens, {args.dtype}, "
        f"{report['device'].get('gpu') or 'cpu'}; token selection and routing {setup_s:.2f} s"
    )
    print(f"{'GPUs':>5}{'step s':>9}{'tokens/s':>11}{'scaling':>9}{'tokens per rank (vol+img)':>34}{'peak GiB':>18}")
    for row in rows:
        per_rank = " ".join(str(r["volume_tokens"] + r["image_tokens"]) for r in row["per_rank"])
        memory = " ".join(f"{r['peak_memory_gib']:.1f}" for r in row["per_rank"] if r["peak_memory_gib"] is not None)
        efficiency = f"{row['scaling_efficiency']:.0%}" if row["scaling_efficiency"] else "-"
        print(
            f"{row['gpus']:>5}{row['step_s']:>9.3f}{row['tokens_per_s']:>11.0f}{efficiency:>9}"
            f"{per_rank:>34}{memory or '-':>18}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

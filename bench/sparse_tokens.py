"""Benchmark: stage 2's token selection and routing alone, section by section (issue 8's paper-forward profile).

    python bench/sparse_tokens.py [--config paper] [--views 16] [--res 768] [--device auto] [--repeats 3]
                                  [--out out/bench/sparse_tokens.json]

The sections `bench/model_forward.py --profile` calls "informative tokens" and "layout + routing",
without the transformer around them, on the same stand-in geometry (a sphere of radius 0.8, its exact
masks, ring cameras): informative voxels (eq. 13), foreground patches, the patches' 3D points (opacity
peaks), the block layout, then 3D-aware routing of the four pairs (vv, vi, ii, iv). Median wall time over
--repeats runs after one warm-up, the device synchronised around each section. Prints a table and
writes JSON; nothing here asserts a time. On a CPU use --repeats 1: routing takes minutes there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from backend.device import device_report, pick_device
from backend.model.config import CONFIGS
from backend.model.sparse import build_layout, foreground_patches, informative_voxels, patch_points, route
from bench.model_forward import Sphere, ring_cameras, sphere_masks, synchronise


def timed(function, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up, and the last result."""
    result, seconds = function(), []
    for _ in range(repeats):
        synchronise(device)
        begin = time.perf_counter()
        result = function()
        synchronise(device)
        seconds.append(time.perf_counter() - begin)
    return statistics.median(seconds), result


def run(config_name: str, views: int, size: int, device: torch.device, repeats: int) -> dict:
    config = CONFIGS[config_name]
    sphere, cameras = Sphere(device), ring_cameras(views, size, device)
    masks = sphere_masks(cameras)
    p, resolution = config.patch_size, config.sparse_volume_tokens
    times = {}
    times["informative voxels"], voxels = timed(
        lambda: informative_voxels(sphere, resolution, config.sdf_threshold, config.sdf_subsamples, device),
        device,
        repeats,
    )
    times["foreground patches"], patches = timed(lambda: foreground_patches(masks, p).nonzero(), device, repeats)
    times["patch points"], points = timed(lambda: patch_points(sphere, cameras, patches, p), device, repeats)
    times["layout"], layout = timed(lambda: build_layout([voxels], [patches], [points], config), device, repeats)
    times["routing (vv, vi, ii, iv)"], _ = timed(lambda: route(layout, [cameras], config), device, repeats)
    return {
        "config": config_name,
        "views": views,
        "resolution": size,
        "volume tokens": len(voxels),
        "image tokens": len(patches),
        "volume blocks": layout.volume.num_blocks,
        "image blocks": layout.image.num_blocks,
        "seconds": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper", choices=list(CONFIGS))
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--res", type=int, default=768)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/bench/sparse_tokens.json"))
    args = parser.parse_args()
    device = pick_device(args.device)
    with torch.no_grad():
        row = run(args.config, args.views, args.res, device, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device_report(device), "rows": [row]}, indent=2))
    print(
        f"{row['config']}, {row['views']} views of {row['resolution']}^2: {row['volume tokens']} volume tokens in "
        f"{row['volume blocks']} blocks, {row['image tokens']} image tokens in {row['image blocks']} blocks"
    )
    print(f"{'section':<26}{'seconds':>10}")
    for name, seconds in row["seconds"].items():
        print(f"{name:<26}{seconds:>10.4f}")
    print(f"{'total':<26}{sum(row['seconds'].values()):>10.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark: LSRM forward time and peak memory with random weights (issue 4's reference-path numbers).

    python bench/model_forward.py [--configs small paper] [--views 8 16] [--res 512 768] [--device auto]
                                  [--dtype bfloat16] [--dense-blocks 1] [--nsa kernels|reference]
                                  [--profile] [--out out/bench/model_forward.json]

Random weights predict no surface, so a sphere of radius 0.8 (its SDF and its exact masks) stands in
for the stage-1 geometry that picks stage 2's tokens; the token counts are printed. Per case: stage-1
time, the whole forward (stage 1 + token selection + routing + stage 2 with the reference NSA ops),
and, for comparison, dense attention blocks run over the same stage-2 tokens (timed for
--dense-blocks blocks and scaled to the model's depth; the table says so). Prints a table and writes
JSON. --nsa picks the NSA ops: `kernels` (the Triton/SDPA kernels where they apply, CUDA) or
`reference` (the PyTorch reference everywhere). --profile adds, per case, one forward timed by
section (`backend.model.timing`: tokenise, stage 1, dense volume, informative tokens, layout +
routing, kernel lists, each stage-2 block; the device synchronised at every section edge) and one
forward under torch.profiler (the ops with the most self device time, self CPU time on a CPU), as
tables and in the JSON. A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from backend.cameras import Cameras, image_rays
from backend.data.synthetic import look_at
from backend.device import device_report, pick_device
from backend.model.attention import DenseBlock
from backend.model.config import CONFIGS
from backend.model.lsrm import LSRM, Views
from backend.model.timing import section_times
from kernels.nsa import reference_only

RADIUS = 0.8


class Sphere:
    """The stand-in stage-1 geometry: a sphere's exact SDF."""

    def __init__(self, device: torch.device) -> None:
        self.beta = torch.tensor(0.01, device=device)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return points.norm(dim=-1) - RADIUS


def ring_cameras(views: int, size: int, device: torch.device) -> Cameras:
    azimuth = torch.arange(views) * 2 * math.pi / views
    elevation = torch.where(torch.arange(views) % 2 == 0, 0.35, -0.1)
    eyes = 3.0 * torch.stack([elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], -1)
    focal = 0.5 * size / math.tan(math.radians(20))
    intrinsics = torch.tensor([focal, focal, size / 2, size / 2]).repeat(views, 1)
    return Cameras(look_at(eyes, torch.zeros(3)), intrinsics, size, size).to(device)


def sphere_masks(cameras: Cameras) -> torch.Tensor:
    origins, directions = image_rays(cameras)
    closest = (origins * directions).sum(-1)
    distance_squared = (origins * origins).sum(-1) - closest**2
    return (distance_squared < RADIUS**2).float()


def timed(function, device: torch.device, repeats: int = 2) -> tuple[float, object]:
    result = function()  # warm-up (allocator, kernels)
    synchronise(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        result = function()
    synchronise(device)
    return (time.perf_counter() - begin) / repeats, result


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_forward(forward, device: torch.device, top: int = 15) -> dict:
    """One forward timed by section and one under torch.profiler: {"sections": [...], "top_ops": [...]}."""
    with section_times(device) as times:
        forward()
    sections = [
        {"section": name, "seconds": t.seconds, "calls": t.calls, "depth": t.depth} for name, t in times.items()
    ]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        forward()
        synchronise(device)
    on_device = device.type == "cuda"
    events = [e for e in profiler.key_averages() if not e.key.startswith("ProfilerStep")]
    events.sort(key=lambda e: e.self_device_time_total if on_device else e.self_cpu_time_total, reverse=True)
    top_ops = [
        {
            "op": e.key,
            "calls": e.count,
            "self_device_ms": e.self_device_time_total / 1e3,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
        }
        for e in events[:top]
    ]
    return {"sections": sections, "top_ops": top_ops, "top_ops_by": "self device time" if on_device else "self CPU"}


def print_profile(row: dict) -> None:
    profile = row["profile"]
    print(f"\n{row['config']} {row['views']} views of {row['resolution']}^2, {row.get('nsa')}: time by section")
    print(f"{'section':<34}{'calls':>6}{'seconds':>10}")
    for s in profile["sections"]:
        print(f"{'  ' * s['depth'] + s['section']:<34}{s['calls']:>6}{s['seconds']:>10.4f}")
    print(f"top ops by {profile['top_ops_by']}")
    print(f"{'op':<60}{'calls':>7}{'self dev ms':>13}{'self cpu ms':>13}")
    for op in profile["top_ops"]:
        print(f"{op['op'][:59]:<60}{op['calls']:>7}{op['self_device_ms']:>13.2f}{op['self_cpu_ms']:>13.2f}")


def run_case(
    name: str,
    views: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    dense_blocks: int,
    profile: bool = False,
) -> dict:
    config = dataclasses.replace(CONFIGS[name], sparse_image_size=size)
    model = LSRM(config).to(device).eval()
    cameras = ring_cameras(views, size, device)
    masks = sphere_masks(cameras)[None]
    images = torch.rand(1, views, size, size, 3, device=device) * masks[..., None]
    batch = Views(images, masks, [cameras])
    guide = [Sphere(device)]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    record = {"config": name, "views": views, "resolution": size, "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), autocast:
        record["stage1_s"], _ = timed(lambda: model(batch, stages=1), device)
        record["forward_s"], prediction = timed(lambda: model(batch, stages=2, guide=guide), device)
        record.update(prediction.counts)
        if device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if profile:
            record["profile"] = profile_forward(lambda: model(batch, stages=2, guide=guide), device)
        # Dense attention over the same stage-2 tokens, for comparison.
        v = torch.randn(1, prediction.counts["volume tokens"], config.hidden, device=device)
        i = torch.randn(1, prediction.counts["image tokens"], config.hidden, device=device)
        blocks = [DenseBlock(config).to(device).eval() for _ in range(dense_blocks)]

        def dense() -> None:
            x, y = v, i
            for block in blocks:
                x, y = block(x, y)

        try:
            seconds, _ = timed(dense, device, repeats=1)
            record["dense_stage2_s"] = seconds * config.blocks / dense_blocks
        except torch.OutOfMemoryError:
            record["dense_stage2_s"] = None
    record["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "paper"], choices=list(CONFIGS))
    parser.add_argument("--views", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--res", nargs="+", type=int, default=[512, 768])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--dense-blocks", type=int, default=1, help="dense blocks to time (scaled to the depth)")
    parser.add_argument("--nsa", default="kernels", choices=["kernels", "reference"], help="NSA ops to run")
    parser.add_argument("--profile", action="store_true", help="time each section and list the top ops")
    parser.add_argument("--out", type=Path, default=Path("out/bench/model_forward.json"))
    args = parser.parse_args()
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.configs:
        for views in args.views:
            for size in args.res:
                try:
                    with reference_only() if args.nsa == "reference" else contextlib.nullcontext():
                        rows.append(run_case(name, views, size, device, dtype, args.dense_blocks, args.profile))
                    rows[-1]["nsa"] = args.nsa
                except torch.OutOfMemoryError as error:
                    rows.append(
                        {"config": name, "views": views, "resolution": size, "error": f"out of memory: {error}"}
                    )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(rows[-1]), flush=True)
    report = {"device": device_report(device), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    header = f"{'config':<7}{'views':>6}{'res':>6}{'img tok':>9}{'vol tok':>9}{'stage1 s':>10}{'forward s':>10}"
    print(header + f"{'dense s*':>10}{'peak GiB':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['config']:<7}{row['views']:>6}{row['resolution']:>6}  {row['error'][:60]}")
            continue
        dense = f"{row['dense_stage2_s']:.3f}" if row.get("dense_stage2_s") is not None else "OOM"
        print(
            f"{row['config']:<7}{row['views']:>6}{row['resolution']:>6}{row['image tokens']:>9}"
            f"{row['volume tokens']:>9}{row['stage1_s']:>10.3f}{row['forward_s']:>10.3f}{dense:>10}"
            f"{row.get('peak_memory_gib', float('nan')):>10.2f}"
        )
    print("dense s*: dense attention blocks over the same stage-2 tokens, timed for --dense-blocks and scaled")
    for row in rows:
        if "profile" in row:
            print_profile(row)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

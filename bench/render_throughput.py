"""Benchmark: synthetic training batches rendered by our VolSDF renderer (the training-data path).

    python bench/render_throughput.py [--device auto] [--objects 4] [--views 8] [--res 128] [--out FILE.json]

Prints a table and writes JSON: device, GPU name, shapes, dtype, samples per ray, seconds per object,
objects/s, rays/s, peak memory. Object construction and environment prefiltering are timed apart
from rendering; the first object warms up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil
import torch

from backend.data.synthetic import render_batch, sample_scene
from backend.device import device_report, pick_device
from backend.render import RenderOptions
from backend.shading import Environment, builtin_environment


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--importance-samples", type=int, default=64)
    parser.add_argument("--chunk-rays", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=Path("out/bench/render_throughput.json"))
    args = parser.parse_args()

    device = pick_device(args.device)
    options = RenderOptions(args.samples, args.importance_samples, args.chunk_rays)
    start = time.perf_counter()
    environment = Environment.load(builtin_environment("studio"), device=device)
    environment.irradiance(torch.tensor([[0.0, 0.0, 1.0]], device=device))  # builds the prefiltered maps
    synchronise(device)
    environment_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scenes = [sample_scene(seed, args.views, args.res, device) for seed in range(args.objects + 1)]
    scene_seconds = (time.perf_counter() - start) / len(scenes)

    with torch.no_grad():
        render_batch(scenes[:1], environment, options)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronise(device)
        start = time.perf_counter()
        output = render_batch(scenes[1:], environment, options)
        synchronise(device)
        render_seconds = time.perf_counter() - start

    rays = args.objects * args.views * args.res * args.res
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss
    result = {
        **device_report(device),
        "objects": args.objects,
        "views": args.views,
        "resolution": args.res,
        "dtype": str(output.rgb.dtype),
        "samples_per_ray": args.samples + args.importance_samples,
        "environment_prefilter_s": environment_seconds,
        "object_build_s": scene_seconds,
        "render_s_per_object": render_seconds / args.objects,
        "objects_per_s": args.objects / render_seconds,
        "rays_per_s": rays / render_seconds,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    name = result["gpu"] or "cpu"
    print(f"{'device':<10}{'views x res':>14}{'spp':>6}{'s/object':>10}{'objects/s':>11}{'Mrays/s':>9}{'peak GiB':>10}")
    print(
        f"{name[:10]:<10}{f'{args.views} x {args.res}^2':>14}{args.samples + args.importance_samples:>6}"
        f"{result['render_s_per_object']:>10.3f}{result['objects_per_s']:>11.2f}{rays / render_seconds / 1e6:>9.2f}"
        f"{peak / 2**30:>10.2f}"
    )
    print(f"(environment prefilter {environment_seconds:.2f} s, object build {scene_seconds:.3f} s each) -> {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark of the GLB export path (marching cubes, cleanup + simplify, UV atlas, bake, write).

Exports one seeded synthetic object at each grid resolution, each in a fresh child process so its
peak resident memory is its own, prints a table and writes JSON. A benchmark, not a test: nothing
here fails on a time.

    .venv/bin/python bench/export_timing.py --resolutions 256 512 --out out/bench/export_timing.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("marching cubes", "cleanup + simplify", "uv atlas", "bake", "write")


def export_once(seed: int, resolution: int, texture_size: int, target_faces: int, device: str) -> dict:
    """One export in this process; returns its stage times, face counts and peak RSS."""
    sys.path.insert(0, str(REPO))
    import torch

    from backend.data.synthetic import random_object, world_normalisation
    from backend.export import export_glb

    field = random_object(seed, device)
    stats: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        out = export_glb(
            field,
            Path(folder) / "bench.glb",
            world_normalisation(seed, field),
            resolution=resolution,
            texture_size=texture_size,
            target_faces=target_faces,
            stats=stats,
        )
        total = time.perf_counter() - start
        size = out.stat().st_size
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "resolution": resolution,
        "texture_size": texture_size,
        "target_faces": target_faces,
        "seconds": {stage: stats[f"{stage} s"] for stage in STAGES} | {"total": total},
        "faces": {key: int(stats[f"{key} faces"]) for key in ("marching cubes", "clean", "final")},
        "glb_bytes": size,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    }


def machine(device: str) -> dict:
    import psutil
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--seed", type=int, default=7, help="synthetic object seed (default 7)")
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--target-faces", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "export_timing.json")
    args = parser.parse_args()

    # A fresh process per resolution: ru_maxrss only ever grows, so a shared process would blur peaks.
    spawn = multiprocessing.get_context("spawn")
    runs = []
    for resolution in args.resolutions:
        with spawn.Pool(1) as pool:
            runs.append(
                pool.apply(export_once, (args.seed, resolution, args.texture_size, args.target_faces, args.device))
            )

    report = {"benchmark": "export_glb", "seed": args.seed, "dtype": "float32", "machine": machine(args.device)}
    report["runs"] = runs
    header = f"{'grid':>6} {'mc faces':>10} {'final':>8} " + " ".join(f"{s:>18}" for s in STAGES)
    print(f"export_glb, synthetic seed {args.seed}, texture {args.texture_size}, device {args.device} (seconds)")
    print(header + f" {'total':>8} {'peak RSS':>10}")
    for run in runs:
        times = " ".join(f"{run['seconds'][stage]:>18.2f}" for stage in STAGES)
        print(
            f"{run['resolution']:>5}³ {run['faces']['marching cubes']:>10} {run['faces']['final']:>8} {times}"
            f" {run['seconds']['total']:>8.2f} {run['peak_rss_mib']:>7.0f} MiB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

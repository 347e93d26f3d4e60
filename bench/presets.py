"""Benchmark: each preset's wall time, peak memory and relit quality per object.

    python bench/presets.py [--presets fast standard high] [--seeds 11 12] [--views 16] [--res 512]
                            [--test-res 256] [--device auto] [--demo] [--out out/bench/presets.json]
                            [--checkpoint MODEL.safetensors] [--engines feedforward refine both]

Per preset and synthetic seed: render a bundle (16 views at 512^2 by default) with our renderer under
the studio world, reconstruct it with that preset (wall time, stage times, peak GPU memory), then
relight both the reconstruction and the true object under a different world (forest) from four new
cameras and score PSNR-H, PSNR-L and SSIM inside the true mask. With --engines, each preset runs once
per engine named (feedforward and both need --checkpoint); by default each preset runs its own engine.
With --demo, also the real-model demo (Cycles ground truth; see backend/demo.py). Prints a table and
writes JSON. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from backend.data.synthetic import random_object, sample_cameras, world_normalisation, write_synthetic_bundle
from backend.demo import run_demo
from backend.device import device_report, pick_device
from backend.metrics import image_metrics
from backend.reconstruct import ENGINES, reconstruct
from backend.render import render_views
from backend.shading import Environment, builtin_environment

TEST_WORLD = "forest"
TEST_VIEWS = 4
TEST_CAMERA_SEED_OFFSET = 1000  # new viewpoints: another seed's camera ring around the same object


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def relit_scores(seed: int, result, test_res: int, device: torch.device) -> dict[str, float]:
    """Relight reconstruction and truth under the test world from new cameras; mean image metrics."""
    truth = random_object(seed, device)
    truth_frame = world_normalisation(seed, truth)
    world_cameras = sample_cameras(seed + TEST_CAMERA_SEED_OFFSET, TEST_VIEWS, test_res, truth, truth_frame)
    environment = Environment.load(builtin_environment(TEST_WORLD), device=device)
    with torch.no_grad():
        ours = render_views(
            result.field, result.normalisation.cameras_to_canonical(world_cameras).to(device), environment
        )
        gt = render_views(truth, truth_frame.cameras_to_canonical(world_cameras).to(device), environment)
    views = [
        image_metrics(ours.rgb[v].cpu(), gt.rgb[v].cpu(), gt.alpha[v, ..., 0].cpu() > 0.5) for v in range(TEST_VIEWS)
    ]
    return {key: float(np.mean([v[key] for v in views])) for key in views[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["fast", "standard", "high"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[11, 12])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--test-res", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--demo", action="store_true", help="also run the real-model demo per preset")
    parser.add_argument("--out", type=Path, default=Path("out/bench/presets.json"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="LSRM weights for the feed-forward engines")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=[None], help="default: each preset's own")
    args = parser.parse_args()
    device = pick_device(args.device)
    work = args.out.parent / "presets_work"

    bundles = {}
    for seed in args.seeds:
        bundles[seed] = write_synthetic_bundle(seed, args.views, args.res, None, work / f"synth_{seed}", device)

    rows = []
    runs = [(preset, engine, seed) for preset in args.presets for engine in args.engines for seed in args.seeds]
    for preset, engine, seed in runs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = reconstruct(
            bundles[seed],
            work / f"{preset}_{engine}_{seed}.glb",
            preset=preset,
            device=device,
            engine=engine,
            checkpoint=args.checkpoint,
        )
        seconds = time.perf_counter() - start
        row = {
            "preset": preset,
            "engine": result.engine,
            "object": f"synthetic seed {seed}",
            "views": args.views,
            "resolution": args.res,
            "seconds": seconds,
            "peak_memory_bytes": peak_memory(device),
            "training_psnr": result.training_psnr,
            "stages": result.timings,
            **relit_scores(seed, result, args.test_res, device),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stages"}), flush=True)
    for preset in args.presets if args.demo else []:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        metrics = run_demo(work / f"demo_{preset}", preset=preset, device=args.device)
        rows.append(
            {
                "preset": preset,
                "engine": metrics.get("engine", "refine"),
                "object": "demo barrel (Cycles GT)",
                "views": metrics["views"]["input"],
                "resolution": 256,
                "seconds": time.perf_counter() - start,
                "peak_memory_bytes": peak_memory(device),
                "training_psnr": metrics["training_psnr"],
                "stages": metrics["timings"],
                **metrics["relit"]["mean"],
                **metrics["geometry"],
            }
        )

    report = {**device_report(device), "dtype": "float32", "test_world": TEST_WORLD, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{'preset':<9}{'engine':<12}{'object':<26}{'views x res':>13}{'s/object':>10}{'peak GiB':>10}"
        f"{'train dB':>10}{'PSNR-H':>8}{'PSNR-L':>8}{'SSIM':>7}"
    )
    for row in rows:
        print(
            f"{row['preset']:<9}{row['engine']:<12}{row['object'][:25]:<26}"
            f"{str(row['views']) + ' x ' + str(row['resolution']):>13}"
            f"{row['seconds']:>10.1f}{row['peak_memory_bytes'] / 2**30:>10.2f}{_decibels(row['training_psnr']):>10}"
            f"{row['psnr_h']:>8.2f}{row['psnr_l']:>8.2f}{row['ssim']:>7.3f}"
        )
    print(f"({report.get('gpu') or 'cpu'}) -> {args.out}")


def _decibels(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()

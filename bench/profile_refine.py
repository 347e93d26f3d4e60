"""Profile Engine B (backend/refine.py): time per stage and per step, top operators, launches, syncs, memory.

    python bench/profile_refine.py --preset standard --device cuda --out $OUT/profile
    python bench/profile_refine.py --preset cpu --views 16 --res 64 --score --set coarse_steps=200

One synthetic object (backend.data.synthetic, seed --seed) is rendered with our renderer under the
studio world into --views views of --res^2 pixels, then refined with the preset's RefineConfig (known
lighting, as a synthetic bundle carries it), timed per stage. A second, short run (--profile-steps
steps per image stage) goes through torch.profiler: the top operators by self time, kernel launches
and host<->device copies/syncs per step. With --score, the refined field is also relit under another
world (forest) from four new cameras and scored like bench/presets.py (PSNR-H, PSNR-L, SSIM inside the
true mask), plus Chamfer distance and normal error against the true surface, all in the canonical box.
--set KEY=VALUE overrides any RefineConfig field (weights.NAME for a loss weight) for experiments.
Prints tables and writes OUT/profile.json (+ OUT/trace.json, a Chrome trace of the short run).
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.profiler import ProfilerActivity, profile

from backend.data.synthetic import environment_rotation, sample_cameras, sample_scene
from backend.device import device_report, pick_device
from backend.errors import run_script
from backend.mesh import extract_surface, sample_points
from backend.metrics import geometry_metrics, image_metrics
from backend.presets import variant
from backend.refine import RefineConfig, refine
from backend.render import RenderOptions, render_views
from backend.shading import Environment, builtin_environment

TRAIN_WORLD, TEST_WORLD = "studio", "forest"
TEST_VIEWS = 4
TEST_CAMERA_SEED_OFFSET = 1000  # as bench/presets.py: another seed's camera ring around the same object
SURFACE_SAMPLES = 8192
# Runtime-API calls that wait for the GPU or copy through the host; each one stalls the launch queue.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaEventSynchronize")


def training_views(seed: int, views: int, resolution: int, device: torch.device):
    """The seeded object's canonical cameras, straight clipped linear images and masks under the studio world."""
    scene = sample_scene(seed, views, resolution, device)
    environment = Environment.load(builtin_environment(TRAIN_WORLD), environment_rotation(seed), device=device)
    with torch.no_grad():
        out = render_views(scene.object, scene.canonical_cameras, environment, RenderOptions(chunk_rays=8192))
    masks = out.alpha[..., 0].clamp(0.0, 1.0)
    images = (out.rgb / out.alpha.clamp_min(1e-3)).clamp(0.0, 1.0)  # as an 8-bit RGBA PNG would hold them
    return scene, images, masks, environment


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss


def score(scene, field, test_res: int, device: torch.device) -> dict[str, float]:
    """Relit image metrics under the test world from new cameras, and geometry metrics, canonical frame."""
    world_cameras = sample_cameras(
        scene.seed + TEST_CAMERA_SEED_OFFSET, TEST_VIEWS, test_res, scene.object.to("cpu"), scene.normalisation
    )
    cameras = scene.normalisation.cameras_to_canonical(world_cameras).to(device)
    environment = Environment.load(builtin_environment(TEST_WORLD), device=device)
    with torch.no_grad():
        ours = render_views(field, cameras, environment).map(lambda b: b.cpu())
        truth = render_views(scene.object, cameras, environment).map(lambda b: b.cpu())
    views = [image_metrics(ours.rgb[v], truth.rgb[v], truth.alpha[v, ..., 0] > 0.5) for v in range(TEST_VIEWS)]
    metrics = {key: float(np.mean([v[key] for v in views])) for key in views[0]}
    samples = []
    for surface_field in (field, scene.object):
        points, normals = sample_points(extract_surface(surface_field, 128), SURFACE_SAMPLES, seed=0)
        samples += [torch.from_numpy(points), torch.from_numpy(normals)]
    return {**metrics, **geometry_metrics(*samples)}


def profiled_run(config: RefineConfig, steps: int, inputs, device: torch.device, trace: Path) -> dict:
    """A short run of `steps` per image stage under torch.profiler: top operators, launches and syncs per step."""
    short = dataclasses.replace(config, prefit_steps=min(config.prefit_steps, 5), coarse_steps=steps, fine_steps=steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cameras, images, masks, environment = inputs
    refine(cameras, images, masks, dataclasses.replace(short, coarse_steps=2, fine_steps=2), environment=environment)
    synchronise(device)  # warm-up (allocator, kernels' first launch) outside the trace
    with profile(activities=activities) as profiler:
        result = refine(cameras, images, masks, short, environment=environment)
        synchronise(device)
    profiler.export_chrome_trace(str(trace))
    events = profiler.key_averages()
    image_steps = sum(result.report.stages[s].steps for s in ("coarse", "fine") if s in result.report.stages)
    total_steps = image_steps + short.prefit_steps
    device_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, device_time, 0.0), reverse=True)
    top = [
        {
            "name": e.key,
            "calls_per_step": e.count / total_steps,
            "self_ms_per_step": getattr(e, device_time, 0.0) / 1e3 / total_steps,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / total_steps,
        }
        for e in rows[:25]
    ]
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = {e.key: e.count / total_steps for e in events if e.key in SYNC_CALLS}
    aten_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return {
        "steps": {"prefit": short.prefit_steps, "image": image_steps},
        "seconds": result.report.seconds,
        "aten_ops_per_step": aten_ops / total_steps,
        "kernel_launches_per_step": launches / total_steps,
        "host_syncs_and_copies_per_step": syncs,
        "top_operators": top,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps per image stage of the profiled run")
    parser.add_argument("--no-profile", action="store_true", help="only the timed run")
    parser.add_argument("--score", action="store_true", help="relight and score the timed run's field")
    parser.add_argument("--test-res", type=int, default=256)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RefineConfig overrides")
    parser.add_argument("--out", type=Path, default=Path("out/bench/profile"))
    args = parser.parse_args()
    device = pick_device(args.device)
    config = variant(args.preset, args.set).refine
    args.out.mkdir(parents=True, exist_ok=True)

    clock = time.perf_counter()
    scene, images, masks, environment = training_views(args.seed, args.views, args.res, device)
    synchronise(device)
    render_seconds = time.perf_counter() - clock
    inputs = (scene.canonical_cameras, images, masks, environment)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = time.perf_counter()
    result = refine(*inputs[:3], config, environment=environment)
    synchronise(device)
    seconds = time.perf_counter() - clock
    memory = peak_memory(device)
    report = result.report
    stages = {
        name: {
            "steps": stage.steps,
            "seconds": stage.seconds,
            "ms_per_step": 1e3 * stage.seconds / max(stage.steps, 1),
            "losses": stage.losses,
        }
        for name, stage in report.stages.items()
    }
    summary = {
        **device_report(device),
        "dtype": "float32",
        "preset": args.preset,
        "config": dataclasses.asdict(config),
        "object": f"synthetic seed {args.seed}",
        "views": args.views,
        "resolution": args.res,
        "input_render_seconds": render_seconds,
        "refine_seconds": seconds,
        "stages": stages,
        "training_psnr": report.training_psnr,
        "sparse_voxels": report.sparse_voxels,
        "skipped_steps": getattr(report, "skipped_steps", 0),
        "peak_memory_bytes": memory,
    }
    print(f"{args.preset} on {summary.get('gpu') or 'cpu'}: {args.views} views x {args.res}^2, seed {args.seed}")
    print(f"{'stage':<14}{'steps':>7}{'seconds':>10}{'ms/step':>10}")
    for name, stage in stages.items():
        print(f"{name:<14}{stage['steps']:>7}{stage['seconds']:>10.2f}{stage['ms_per_step']:>10.2f}")
    print(f"{'refine total':<14}{'':>7}{seconds:>10.2f}")
    print(
        f"training PSNR {report.training_psnr:.2f} dB, {report.sparse_voxels} sparse voxels, "
        f"{getattr(report, 'skipped_steps', 0)} skipped steps, peak memory {memory / 2**30:.2f} GiB"
    )

    if args.score:
        clock = time.perf_counter()
        summary["scores"] = score(scene, result.field, args.test_res, device)
        summary["score_seconds"] = time.perf_counter() - clock
        print("relit (" + TEST_WORLD + "): " + ", ".join(f"{k} {v:.4g}" for k, v in summary["scores"].items()))

    if not args.no_profile:
        profiled = profiled_run(config, args.profile_steps, inputs, device, args.out / "trace.json")
        summary["profile"] = profiled
        print(
            f"\nprofiled run ({profiled['steps']['image']} image steps): {profiled['aten_ops_per_step']:.0f} aten ops, "
            f"{profiled['kernel_launches_per_step']:.0f} kernel launches per step; syncs/copies per step: "
            f"{ {k: round(v, 1) for k, v in profiled['host_syncs_and_copies_per_step'].items()} }"
        )
        print(f"{'operator':<48}{'calls/step':>11}{'self ms/step':>14}{'cpu ms/step':>13}")
        for row in profiled["top_operators"]:
            print(
                f"{row['name'][:47]:<48}{row['calls_per_step']:>11.1f}{row['self_ms_per_step']:>14.3f}"
                f"{row['self_cpu_ms_per_step']:>13.3f}"
            )
    path = args.out / "profile.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    run_script(main)

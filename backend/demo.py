"""`python -m backend demo`: reconstruct the committed demo bundle and score it under new lighting.

The demo input (`demo/input`) is a real textured model rendered with Cycles under the `studio` world;
`demo/test` holds four held-out cameras rendered under a different world (`forest`) plus surface
samples of the true model (see demo/README.md). The demo reconstructs the input, relights the result
under the test world from the test cameras with our renderer, and writes:

    OUT/barrel.glb        the relightable asset (import it in Blender: File > Import > glTF 2.0)
    OUT/comparison.png    per test view: nearest input view | ours relit | ground truth relit
    OUT/metrics.json      PSNR-H, PSNR-L, SSIM inside the true mask, Chamfer and normal error, timings
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file
from .bundle import load_bundle
from .device import pick_device
from .errors import InputError
from .exr import read_exr_rgba
from .mesh import extract_surface, sample_points
from .metrics import geometry_metrics, image_metrics
from .progress import Progress, no_progress
from .reconstruct import reconstruct
from .render import RenderOptions, render_views
from .shading import Environment
from .sheet import write_sheet

DEMO = Path(__file__).resolve().parents[1] / "demo"
SURFACE_SAMPLES = 8192  # points on our surface for the geometry metrics, as many as the ground truth has
SURFACE_RESOLUTION = 192  # marching-cubes grid for those points


def default_preset(device: torch.device) -> str:
    """`standard` on a GPU, `cpu` elsewhere (it finishes in minutes on two cores)."""
    return "standard" if device.type == "cuda" else "cpu"


def run_demo(
    out: Path,
    *,
    demo: Path = DEMO,
    preset: str | None = None,
    checkpoint: Path | None = None,
    device: str = "auto",
    progress: Progress = no_progress,
) -> dict:
    """Reconstruct `demo/input` (with the feed-forward model when a checkpoint is given), relight under
    `demo/test`'s world, write the asset, sheet and metrics."""
    begin = time.perf_counter()
    torch_device = pick_device(device)
    preset = preset or default_preset(torch_device)
    inputs = demo / "input"
    test_path = demo / "test"
    if not inputs.is_dir() or not test_path.is_dir():
        raise InputError(f"the demo data is missing under {demo}; run the demo from a clone of the repository")
    test = load_bundle(test_path)
    frames = json.loads((test_path / "transforms.json").read_text())["frames"]
    truth = torch.stack([torch.from_numpy(read_exr_rgba(test_path / frame["hdr_path"])) for frame in frames])
    surface = np.load(test_path / "gt_surface.npy")

    out.mkdir(parents=True, exist_ok=True)
    result = reconstruct(
        inputs, out / "barrel.glb", preset=preset, checkpoint=checkpoint, device=torch_device, progress=progress
    )
    normalisation, field = result.normalisation, result.field

    clock = time.perf_counter()
    spec = test.environment
    environment = Environment.load(spec.path, spec.rotation_z, spec.strength, torch_device)
    cameras = normalisation.cameras_to_canonical(test.cameras).to(torch_device)
    with torch.no_grad():
        ours = render_views(field, cameras, environment, RenderOptions(), progress).map(lambda b: b.cpu())
    mask = test.masks > 0.5
    views = [image_metrics(ours.rgb[v], truth[v, ..., :3], mask[v]) for v in range(len(frames))]
    relight_seconds = time.perf_counter() - clock

    mesh = extract_surface(field, SURFACE_RESOLUTION)
    points, normals = sample_points(mesh, SURFACE_SAMPLES, seed=0)
    truth_points = normalisation.to_canonical(torch.from_numpy(surface[:, :3]))
    geometry = geometry_metrics(
        torch.from_numpy(points), torch.from_numpy(normals), truth_points, torch.from_numpy(surface[:, 3:])
    )

    inputs_bundle = load_bundle(inputs)
    nearest = _nearest_views(inputs_bundle.cameras.centres, test.cameras.centres)
    masks = inputs_bundle.masks[nearest, ..., None]
    inputs_rgba = torch.cat([inputs_bundle.images[nearest] * masks, masks], dim=-1)
    ours_rgba = torch.cat([ours.rgb, ours.alpha], dim=-1)
    write_sheet(out / "comparison.png", [list(row) for row in zip(inputs_rgba, ours_rgba, truth, strict=True)])
    mean = {key: float(np.mean([v[key] for v in views])) for key in views[0]}
    metrics = {
        "preset": preset,
        "engine": result.engine,
        "device": str(torch_device),
        "views": {"input": len(inputs_bundle.names), "test": len(frames)},
        "relit": {"mean": mean, "per_view": views},
        "geometry": geometry,
        "training_psnr": result.training_psnr,
        "warnings": result.warnings,
        "timings": {**result.timings, "relight and score": relight_seconds, "demo total": time.perf_counter() - begin},
    }
    with atomic_file(out / "metrics.json") as partial:
        partial.write_text(json.dumps(metrics, indent=2))
    return metrics


def _nearest_views(input_centres: torch.Tensor, test_centres: torch.Tensor) -> list[int]:
    """For each test camera, the input camera closest in direction from the object."""
    a = torch.nn.functional.normalize(input_centres - input_centres.mean(0), dim=-1)
    b = torch.nn.functional.normalize(test_centres - input_centres.mean(0), dim=-1)
    return (b @ a.T).argmax(1).tolist()

"""Benchmark: why a refinement fits (or does not fit) its views: per-term losses, beta, offsets, materials,
and how well the exported surface's silhouette covers the masks.

    python bench/refine_quality.py DIR --out RUN --preset cpu [--assets NAME ...] [--set KEY=VALUE ...]
                                   [--device auto]

DIR is a prepared folder (`evaluate --phase inputs`: DIR/inputs.json, DIR/<name>/bundle/). Each asset is
reconstructed with the preset (RefineConfig fields overridden by --set, e.g. --set final_beta=0.003
weights.silhouette=0.5) into
RUN/<name>.glb + RUN/<name>.json (the record `evaluate --phase score --reconstructions RUN` reads), and the
field is probed on the training views:
- training PSNR (foreground, linear) and each loss term at the end of each stage;
- the final VolSDF beta, and LIRM's offset at the rendered surface points (mean, and its share above a voxel);
- the materials at those points (mean and quartiles of roughness and metallic, mean albedo);
- silhouettes of the SDF's zero level set (what becomes the mesh: a ray covers a pixel when the SDF falls below
  0 somewhere along it) against the masks: recall (mask pixels covered) and precision;
- for procedural assets (synthetic_<seed>), the true materials at the same points and our mean errors.
Prints a table and writes RUN/diagnostics.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

import torch  # noqa: E402

from backend import presets  # noqa: E402
from backend.bundle import canonical_normalisation, load_bundle  # noqa: E402
from backend.cameras import image_rays  # noqa: E402
from backend.data.synthetic import random_object, world_normalisation  # noqa: E402
from backend.device import pick_device  # noqa: E402
from backend.errors import run_script  # noqa: E402
from backend.evaluate import INPUTS_INDEX, EvaluateConfig, reconstruct_prepared  # noqa: E402
from backend.field import SurfaceField  # noqa: E402
from backend.render import RenderOptions, render_rays  # noqa: E402

PROBE_RAYS = 4096  # seeded training pixels for the surface probes
SILHOUETTE_SAMPLES = 256  # uniform samples per ray for the zero-level-set silhouette ...
SILHOUETTE_IMPORTANCE = 32  # ... plus these near the rendered surface
SILHOUETTE_RAYS = 32768  # seeded pixels (of every view) it is measured on


def silhouette(field: SurfaceField, origins: torch.Tensor, directions: torch.Tensor, environment) -> torch.Tensor:
    """Per ray [N] (bool): does the SDF's zero level set (the exported surface) lie on the ray inside the box?

    The renderer's `min_sdf` (the smallest SDF sample, LIRM's offset left out), with many uniform samples.
    """
    options = RenderOptions(SILHOUETTE_SAMPLES, SILHOUETTE_IMPORTANCE, chunk_rays=512, surface_normals=True)
    with torch.no_grad():
        return render_rays(field, origins, directions, environment, options).min_sdf[:, 0] < 0.0


def truth_at(name: str, points: torch.Tensor, bundle_folder: Path):
    """The procedural ground truth (synthetic_<seed>) at canonical points of the bundle, or None for other assets."""
    if not name.startswith("synthetic_"):
        return None
    truth = random_object(int(name.removeprefix("synthetic_")))
    ours = canonical_normalisation(load_bundle(bundle_folder))
    world = ours.to_world(points.cpu())
    with torch.no_grad():
        return truth(world_normalisation(truth_seed(name), truth).to_canonical(world))


def truth_seed(name: str) -> int:
    return int(name.removeprefix("synthetic_"))


def probe(field: SurfaceField, result, cameras, images, masks, environment, name: str, bundle: Path) -> dict:
    """The field's state on the training views (see the module docstring)."""
    origins, directions = image_rays(cameras)
    origins, directions, masks = origins.reshape(-1, 3), directions.reshape(-1, 3), masks.reshape(-1)
    generator = torch.Generator().manual_seed(0)
    foreground = (masks >= 0.5).nonzero()[:, 0]
    pick = foreground[torch.randperm(len(foreground), generator=generator)[:PROBE_RAYS]]
    with torch.no_grad():
        out = render_rays(field, origins[pick], directions[pick], environment, RenderOptions(48, 32))
        hit = (out.alpha[:, 0] > 0.5).float()
        points = origins[pick] + directions[pick] * out.depth
        sample = field(points)
    voxel = 2.0 / field.config.sparse_resolution

    def quartiles(values: torch.Tensor) -> list[float]:
        values = values[hit > 0]
        if not len(values):
            return []
        return [
            round(float(q), 3)
            for q in torch.quantile(values.float(), torch.tensor([0.25, 0.5, 0.75], device=values.device))
        ]

    subset = torch.randperm(len(masks), generator=generator)[:SILHOUETTE_RAYS]  # seeded; all pixels take minutes
    inside = masks[subset] >= 0.5
    covered = silhouette(field, origins[subset], directions[subset], environment).to(inside.device)
    recall = float(covered[inside].float().mean())
    precision = float(inside[covered].float().mean()) if covered.any() else 0.0
    truth = truth_at(name, points[hit > 0], bundle)
    compared = {}
    if truth is not None:
        ours = {"roughness": sample.roughness, "metallic": sample.metallic, "albedo": sample.albedo}
        for key, value in ours.items():
            compared[f"{key}_error"] = round(float((value[hit > 0].cpu() - getattr(truth, key)).abs().mean()), 3)
        compared["truth_roughness_mean"] = round(float(truth.roughness.mean()), 3)
        compared["truth_metallic_mean"] = round(float(truth.metallic.mean()), 3)
        compared["truth_albedo_mean"] = [round(float(v), 3) for v in truth.albedo.mean(0)]
        compared["truth_surface_distance"] = round(float(truth.sdf.abs().median()), 4)
    return {
        **compared,
        "training_psnr": result.report.training_psnr,
        "beta": float(field.beta.detach()),
        "offset_mean": float(sample.offset[hit > 0].mean()),
        "offset_abs_over_voxel": float((sample.offset[hit > 0].abs() > voxel).float().mean()),
        "roughness_quartiles": quartiles(sample.roughness),
        "metallic_quartiles": quartiles(sample.metallic),
        "albedo_mean": [round(float(v), 3) for v in sample.albedo[hit > 0].mean(0)],
        "mesh_silhouette_recall": recall,
        "mesh_silhouette_precision": precision,
        "stages": result.report.as_dict()["stages"],
    }


def reconstruct_and_probe(prepared: Path, name: str, out: Path, config: EvaluateConfig) -> tuple[dict, dict]:
    """reconstruct_prepared on one asset (the record), with the refined field probed before export (the row)."""
    from backend import reconstruct as reconstruct_module

    original = reconstruct_module.refine
    row = {}

    def refine_and_probe(cameras, images, masks, refine_config, **kwargs):
        result = original(cameras, images, masks, refine_config, **kwargs)
        bundle = prepared / name / "bundle"
        row.update(probe(result.field, result, cameras, images, masks, result.environment, name, bundle))
        return result

    reconstruct_module.refine = refine_and_probe
    try:
        return reconstruct_prepared(prepared / name, out / f"{name}.glb", config), row
    finally:
        reconstruct_module.refine = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared", type=Path, metavar="DIR")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="cpu", choices=list(presets.PRESETS))
    parser.add_argument("--assets", nargs="+", default=None)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    variant = presets.variant(args.preset, args.overrides)
    index = json.loads((args.prepared / INPUTS_INDEX).read_text(encoding="utf-8"))
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.assets or index["assets"]:
        clock = time.perf_counter()
        config = EvaluateConfig(variant.name, device=str(device))
        record, row = reconstruct_and_probe(args.prepared, name, args.out, config)
        record["overrides"] = args.overrides
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        rows[name] = row = {"seconds": time.perf_counter() - clock, **row}
        print(
            f"{name:<18} train {row['training_psnr']:6.2f} dB  beta {row['beta']:.4f}  "
            f"offset {row['offset_mean']:+.4f} (over a voxel {row['offset_abs_over_voxel']:.2f})  "
            f"rough {row['roughness_quartiles']}  metal {row['metallic_quartiles']}  albedo {row['albedo_mean']}  "
            f"mesh silhouette recall {row['mesh_silhouette_recall']:.3f} "
            f"precision {row['mesh_silhouette_precision']:.3f}  {row['seconds']:.0f} s",
            flush=True,
        )
        truth = {key: value for key, value in row.items() if "error" in key or "truth" in key}
        if truth:
            print(f"{'':<18} vs truth: " + ", ".join(f"{key} {value}" for key, value in truth.items()))
    report = {"preset": args.preset, "overrides": args.overrides, "device": str(device), "assets": rows}
    (args.out / "diagnostics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    run_script(main)

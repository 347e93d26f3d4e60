"""Benchmark: one refinement of a prepared asset, traced step by step (issue 3: why `high` overgrew).

    python bench/refine_trace.py BUNDLE --out OUT.json [--preset high] [--size 128] [--set KEY=VALUE ...]
                                 [--every 5] [--stop N] [--prefit-only] [--device auto]

BUNDLE is a bundle folder (e.g. DIR/barrel/bundle of a prepared dev set); its views are area-averaged down to
--size^2 pixels (cameras rescaled), so the preset's budgets run on a CPU with fewer pixels but the same rays
per step unless --set changes them. Every --every image steps it prints one row: beta and each loss term of
that step's batch; --stop N ends after N image steps (the first stages alone). With --prefit-only it runs the
visual-hull pre-fit alone and probes the field it leaves: L1 to the hull's SDF in the box and near its surface,
the eikonal residual and |grad sdf| quantiles in the box, and how much the normals of point pairs near the
surface disagree (the smoothness term's measure, pairs `smoothness_distance` apart). Writes OUT.json.
A benchmark, not a test.
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
import torch.nn.functional as F  # noqa: E402

from backend import presets  # noqa: E402
from backend import refine as refine_module  # noqa: E402
from backend.bundle import canonical_normalisation, load_bundle  # noqa: E402
from backend.device import pick_device  # noqa: E402
from backend.errors import run_script  # noqa: E402
from backend.shading import Environment  # noqa: E402


class _Stop(Exception):  # noqa: N818 (a control-flow signal, not an error)
    pass


def downscaled(bundle_folder: Path, size: int, device: torch.device):
    """Canonical cameras (on the device), images and masks of the bundle at size^2 (area average), and its known
    lighting."""
    bundle = load_bundle(bundle_folder)
    cameras = canonical_normalisation(bundle).cameras_to_canonical(bundle.cameras).resized(size, size).to(device)
    factor = bundle.cameras.width // size
    images = F.avg_pool2d(bundle.images.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1).contiguous()
    masks = F.avg_pool2d(bundle.masks[:, None], factor)[:, 0].contiguous()
    spec = bundle.environment
    environment = Environment.load(spec.path, spec.rotation_z, spec.strength, device) if spec is not None else None
    return cameras, images, masks, environment


def prefit_probe(cameras, masks, config: refine_module.RefineConfig) -> dict:
    """The visual-hull pre-fit alone, and the state of the field it leaves (see the module docstring)."""
    torch.manual_seed(config.seed)
    model = refine_module.initial_field(config, cameras.device)
    target = refine_module.visual_hull_sdf(
        cameras, masks.to(cameras.device), config.hull_resolution, config.hull_mask_threshold
    )  # on the CPU, where the probe's points are drawn
    clock = time.perf_counter()
    losses = refine_module._prefit(model, target.to(cameras.device), config, lambda index, total: None)
    seconds = time.perf_counter() - clock
    generator = torch.Generator().manual_seed(1)
    voxel = 2.0 / config.hull_resolution
    near = (target.abs() < voxel).nonzero()
    surface = -1.0 + (near[torch.randint(len(near), (5000,), generator=generator)].float() + 0.5) * voxel
    pairs = torch.cat([surface, surface]) + torch.randn(10000, 3, generator=generator) * config.smoothness_distance
    box = torch.rand(20000, 3, generator=generator) * 2.0 - 1.0
    points = torch.cat([box, pairs]).to(cameras.device).requires_grad_(True)
    sdf = model.sdf(points)
    (gradient,) = torch.autograd.grad(sdf.sum(), points)
    error = (sdf.detach() - refine_module._trilinear(target.to(cameras.device), points.detach())).abs()
    norm = gradient.norm(dim=-1)
    normals = F.normalize(gradient[20000:], dim=-1)
    return {
        "seconds": seconds,
        "last_batch_l1": losses["sdf l1"],
        "box_l1": float(error[:20000].mean()),
        "near_l1": float(error[20000:].mean()),
        "box_eikonal": float(((norm[:20000] - 1.0) ** 2).mean()),
        "box_gradient_norm_quantiles": [
            round(float(q), 2) for q in torch.quantile(norm[:20000].cpu(), torch.tensor([0.1, 0.5, 0.9]))
        ],
        "near_eikonal": float(((norm[20000:] - 1.0) ** 2).mean()),
        "normal_disagreement": float(((normals[:5000] - normals[5000:]) ** 2).sum(-1).mean()),
    }


def traced_refine(cameras, images, masks, environment, config, every: int, stop: int | None) -> list[dict]:
    """Refine, recording one row of beta and loss terms every `every` image steps; stop after `stop` of them."""
    rows: list[dict] = []
    original = refine_module._losses
    calls = iter(range(10**9))
    clock = time.perf_counter()

    def losses(model, *args):
        terms = original(model, *args)
        step = next(calls)
        if step % every == 0:
            row = {
                "step": step,
                "beta": float(model.beta.detach()),
                **{name: float(value) for name, value in terms.items()},
            }
            rows.append({**row, "seconds": time.perf_counter() - clock})
            print(" ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()), flush=True)
        if stop is not None and step + 1 >= stop:
            raise _Stop
        return terms

    refine_module._losses = losses
    try:
        result = refine_module.refine(cameras, images, masks, config, environment=environment)
        rows.append({"report": result.report.as_dict()})
    except _Stop:
        pass
    finally:
        refine_module._losses = original
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="high", choices=list(presets.PRESETS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--stop", type=int, default=None)
    parser.add_argument("--prefit-only", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    config = presets.variant(args.preset, args.overrides).refine
    device = pick_device(args.device)
    cameras, images, masks, environment = downscaled(args.bundle, args.size, device)
    record = {"preset": args.preset, "size": args.size, "overrides": args.overrides, "device": str(device)}
    if args.prefit_only:
        record["prefit"] = prefit_probe(cameras, masks, config)
        print("\n".join(f"{key:<28} {value}" for key, value in record["prefit"].items()))
    else:
        record["trace"] = traced_refine(cameras, images, masks, environment, config, args.every, args.stop)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    run_script(main)

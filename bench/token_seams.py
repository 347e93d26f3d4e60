"""Are a checkpoint's surfaces broken at the volume tokens' seams? The SDF's jumps across token borders.

    python bench/token_seams.py CHECKPOINT.safetensors [...] [--objects 6] [--inputs 8] [--device auto]
                                [--out bench/results/token_seams.json]

Stage 1 decodes each volume token into its own upsample^3 voxels of the dense grid (`unpatchify`), so
nothing ties a token's voxels to its neighbour's. Per held-out procedural object (seeds below the training
range) this predicts the stage-1 field from views at the model's image size and reads its SDF at the
dense grid's voxel centres. Along each axis it takes the steps between neighbouring voxels near the TRUE
surface (where the true SDF is within two voxels of zero, so wrong geometry does not pick the places),
and compares the mean step across a token border with the mean step inside a token (a smooth field
gives a ratio near 1; the true SDF's own ratio is printed as the reference). It also reports the SDF
error there in voxels: its mean (bias; positive: the surface sits inside the truth, the object shrinks),
its mean size, and its token-periodic part (the spread over the positions inside a token of the mean
error at that position), which marching cubes turns into a lattice of bumps (run 5, docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from a checkout

import torch

from backend.device import pick_device
from backend.field import voxel_centres
from backend.model.checkpoint import load_checkpoint
from backend.model.lsrm import LSRM
from bench.colour_response import held_out_fields


def seam_ratio(sdf: torch.Tensor, near: torch.Tensor, upsample: int) -> float:
    """Mean |step| across token borders over mean |step| inside tokens, for an SDF grid [R, R, R] at the
    steps whose both ends are `near` [R, R, R]."""
    across, inside = [], []
    for axis in range(3):
        steps = sdf.diff(dim=axis).abs()
        kept = near.narrow(axis, 0, near.shape[axis] - 1) & near.narrow(axis, 1, near.shape[axis] - 1)
        border = (torch.arange(steps.shape[axis], device=sdf.device) % upsample) == upsample - 1
        border = border.view([-1 if a == axis else 1 for a in range(3)]).expand_as(steps)
        across.append(steps[kept & border])
        inside.append(steps[kept & ~border])
    across_mean, inside_mean = torch.cat(across).mean(), torch.cat(inside).mean()
    return float(across_mean / inside_mean.clamp_min(1e-12))


def periodic_error(error: torch.Tensor, near: torch.Tensor, upsample: int) -> float:
    """The part of an SDF error grid [R, R, R] that repeats with every token: the spread (std) over the
    upsample^3 positions inside a token of the mean error at that position, over the `near` voxels."""
    index = torch.arange(error.shape[0], device=error.device) % upsample
    position = (index[:, None, None] * upsample + index[None, :, None]) * upsample + index[None, None, :]
    sums = torch.zeros(upsample**3, dtype=error.dtype, device=error.device).index_add_(0, position[near], error[near])
    counts = torch.bincount(position[near], minlength=upsample**3).clamp_min(1)
    return float((sums / counts).std())


def measure(model: LSRM, objects: int, inputs: int, device: torch.device) -> dict:
    config = model.config
    resolution = config.volume_tokens * config.upsample
    axis = torch.arange(resolution, device=device)
    centres = voxel_centres(torch.cartesian_prod(axis, axis, axis), resolution)  # x-major, as the volume
    rows = []
    generator = torch.Generator().manual_seed(0)
    for seed, viewset, field in held_out_fields(model, objects, inputs, 1, device, generator):
        with torch.no_grad():
            predicted = field.sdf(centres).reshape(resolution, resolution, resolution)
            true = viewset.truth.sdf(centres).reshape(resolution, resolution, resolution)
        voxel = 2.0 / resolution
        near = true.abs() < 2 * voxel
        error = (predicted - true) / voxel  # in voxels
        rows.append(
            {
                "seed": seed,
                "seam_ratio": seam_ratio(predicted, near, config.upsample),
                "true_seam_ratio": seam_ratio(true, near, config.upsample),
                "bias_voxels": float(error[near].mean()),  # > 0: the surface sits inside the truth
                "error_voxels": float(error[near].abs().mean()),
                "periodic_error_voxels": periodic_error(error, near, config.upsample),
            }
        )
    keys = ("seam_ratio", "true_seam_ratio", "bias_voxels", "error_voxels", "periodic_error_voxels")
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in keys}
    return {"objects": rows, **{f"mean_{k}": v for k, v in mean.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--objects", type=int, default=6)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/token_seams.json"))
    args = parser.parse_args()
    device = pick_device(args.device)
    results = {}
    columns = ("seam_ratio", "true_seam_ratio", "bias_voxels", "error_voxels", "periodic_error_voxels")
    print(f"{'checkpoint':<40} " + " ".join(f"{c:>21}" for c in columns))
    models = {path: load_checkpoint(path, device) for path in args.checkpoints}  # a bad path fails before any work
    for path, model in models.items():
        result = measure(model, args.objects, args.inputs, device)
        results[str(path)] = result
        print(f"{path.name:<40} " + " ".join(f"{result['mean_' + c]:>21.2f}" for c in columns))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"objects": args.objects, "inputs": args.inputs, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

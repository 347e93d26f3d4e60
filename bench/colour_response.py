"""Does a checkpoint see colour? Predicted albedo against the truth on held-out procedural objects.

    python bench/colour_response.py --checkpoint MODEL.safetensors [--objects 8] [--inputs 8] [--stages 1]
                                    [--device auto] [--out bench/results/colour_response.json]

Per object (seeds below the training range, so never trained on): render input views at the model's
image size under a studio world, predict the field, and read its albedo at points of the TRUE surface,
so wrong geometry does not hide the answer. Prints per object the true and predicted mean albedo (sRGB)
and the albedo PSNR (sRGB, per surface point), then over the objects: the PSNR of a constant guess (the
objects' mean colour), and the correlation and slope of the predicted mean colours against the truth,
for the colour as a whole and for its hue alone (the colour minus its own grey). A model that ignores
its inputs has slope 0; one that sees brightness but not hue (docs/TRAINING.md, "Why colour did not
learn, part 2") has a colour slope near 1/3 and a hue slope near 0; one that sees colour has both near 1.
Without --checkpoint a fresh model of --model is measured (the floor).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from backend.colour import linear_to_srgb
from backend.data.sources import ground_truth_options, synthetic_viewset
from backend.data.views import EnvironmentBank, ViewSet, sample_batch
from backend.device import pick_device
from backend.field import GridField
from backend.model.checkpoint import load_checkpoint
from backend.model.config import CONFIGS
from backend.model.losses import surface_points
from backend.model.lsrm import LSRM

FIRST_SEED = 500_000  # held out: below FIRST_TRAINING_SEED and apart from the evaluation and demo seeds


def psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-10))


def fit(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Correlation and least-squares slope of predicted against true values (all channels pooled)."""
    p, t = predicted - predicted.mean(0), true - true.mean(0)
    denominator = float(np.sqrt((p**2).sum() * (t**2).sum()))
    return {
        "correlation": float((p * t).sum() / denominator) if denominator > 0 else 0.0,
        "slope": float((p * t).sum() / max(float((t**2).sum()), 1e-12)),
    }


def held_out_fields(
    model: LSRM, objects: int, inputs: int, stages: int, device: torch.device, generator: torch.Generator
) -> Iterator[tuple[int, ViewSet, GridField]]:
    """Per held-out procedural object: its seed, its views (`inputs` at the model's image size under a studio
    world) and the field the model predicts from them."""
    bank = EnvironmentBank(("studio",), device)
    options = ground_truth_options(device)
    for seed in range(FIRST_SEED, FIRST_SEED + objects):
        viewset = synthetic_viewset(seed, inputs, model.config.image_size, bank, device, options)
        batch = sample_batch([viewset], inputs, 0, model.config.background, generator)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            field = model(batch.views, stages=stages).fields[0].detached()
        yield seed, viewset, field


def measure(model: LSRM, objects: int, inputs: int, stages: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for seed, viewset, field in held_out_fields(model, objects, inputs, stages, device, generator):
        points = surface_points(viewset.truth, torch.rand(8192, 3, generator=generator).to(device) * 2 - 1)
        with torch.no_grad():
            predicted = linear_to_srgb(field(points).albedo)
            true = linear_to_srgb(viewset.truth(points).albedo)
        rows.append(
            {
                "seed": seed,
                "true_mean": true.mean(0).tolist(),
                "predicted_mean": predicted.mean(0).tolist(),
                "albedo_psnr": psnr(float((predicted - true).square().mean())),
            }
        )
    true = np.array([r["true_mean"] for r in rows])
    predicted = np.array([r["predicted_mean"] for r in rows])
    return {
        "objects": rows,
        "mean_albedo_psnr": float(np.mean([r["albedo_psnr"] for r in rows])),
        **colour_scores(true, predicted),
    }


def colour_scores(true: np.ndarray, predicted: np.ndarray) -> dict:
    """Predicted against true mean colours [K, 3] (sRGB): PSNR, a constant guess's PSNR, and the fits of the
    colour and of its hue alone (each colour minus its own grey)."""
    return {
        "mean_colour_psnr": psnr(float(((predicted - true) ** 2).mean())),
        "constant_guess_psnr": psnr(float(((true - true.mean(0)) ** 2).mean())),
        "colour": fit(predicted, true),
        "hue": fit(predicted - predicted.mean(1, keepdims=True), true - true.mean(1, keepdims=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--model", default="small", help="the fresh model's config when no checkpoint is given")
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/colour_response.json"))
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint, device) if args.checkpoint else LSRM(CONFIGS[args.model]).to(device)
    result = measure(model.eval(), args.objects, args.inputs, args.stages, device)
    print(f"{'seed':>7}  {'true mean (sRGB)':<20} {'predicted mean':<20} {'albedo PSNR':>11}")
    for row in result["objects"]:
        true, predicted = (" ".join(f"{x:.3f}" for x in row[k]) for k in ("true_mean", "predicted_mean"))
        print(f"{row['seed']:>7}  {true:<20} {predicted:<20} {row['albedo_psnr']:>8.2f} dB")
    print(
        f"albedo PSNR {result['mean_albedo_psnr']:.2f} dB; mean colour PSNR {result['mean_colour_psnr']:.2f} dB "
        f"(constant guess {result['constant_guess_psnr']:.2f} dB)"
    )
    for name in ("colour", "hue"):
        print(f"{name}: correlation {result[name]['correlation']:.3f}, slope {result[name]['slope']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "stages": args.stages, **result}, indent=2))


if __name__ == "__main__":
    main()

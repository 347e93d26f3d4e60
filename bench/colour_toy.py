"""The colour toy task: can a fresh model learn to see an object's colour? (docs/TRAINING.md, part 2 and part 3)

    python bench/colour_toy.py [--model tiny] [--variants old skip] [--report 0 100 300 600] [--size 32]
                               [--seed 0] [--loss surface|full] [--threads 1] [--out bench/results/colour_toy.json]

ONE fixed procedural shape (seed 3, 16 views under `studio`) whose albedo is one uniform colour per sample,
drawn like a procedural paint colour (`random_colour`). Its views are exact and cheap: a dielectric's shading
is linear in its albedo, so each sample's images are black + c * (white - black) from two renders made once.
A fresh model of --model (stage 1 only) trains up to the last --report step on batches of 2 samples with 6-8
input views, AdamW 1e-3, gradient clip 1, with the loss --loss: `surface` is the albedo read at points of the
true surface (sRGB MSE) alone; `full` is training's view loss (rendered colour, mask, eikonal, depth, sdf and
surface materials, `TrainConfig`'s weights) through 4 target views. At each --report step it scores 8
held-out colours seen by 8 fixed views with bench/colour_response.py's measures: the predicted mean albedo
against the truth (PSNR, sRGB), and correlation / slope for colour and for hue alone. A colour-blind model
scores colour slope ~1/3 and hue slope ~0; one that sees colour scores both near 1.

Variants (the same seeds, so the same colours, views and initial transformer weights):
  old   the model as in runs 1-3 (`colour_skip` off)
  skip  `ModelConfig.colour_skip`: the unprojected colours reach the albedo through a linear skip
Views are rendered at --size pixels and the model's image size is set to match (smaller is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backend.colour import linear_to_srgb  # noqa: E402
from backend.data.materials import random_colour  # noqa: E402
from backend.data.synthetic import sample_scene  # noqa: E402
from backend.data.views import Batch, EnvironmentBank, ViewSet, render_viewset, sample_batch  # noqa: E402
from backend.field import FieldSample, SurfaceField  # noqa: E402
from backend.model.config import CONFIGS, ModelConfig  # noqa: E402
from backend.model.losses import surface_points  # noqa: E402
from backend.model.lsrm import LSRM  # noqa: E402
from backend.render import RenderOptions  # noqa: E402
from backend.train import TrainConfig, loss_config, target_loss  # noqa: E402
from bench.colour_response import colour_scores  # noqa: E402

SHAPE_SEED = 3  # the one procedural shape
VIEWS = 16
HELD_OUT = 8  # colours scored at each report
VARIANTS = {"old": {"colour_skip": False}, "skip": {"colour_skip": True}}
# `--loss full`: training's terms and weights (normals off, as before training's last steps), fewer rays and points.
FULL_LOSS = dataclasses.replace(loss_config(TrainConfig(out=Path("unused")), 0, 10**9), rays=256, sdf_points=512)


class Painted:
    """A surface field with another field's geometry and roughness, one uniform albedo and no metal."""

    def __init__(self, shape: SurfaceField, albedo: torch.Tensor) -> None:
        self.shape, self.albedo = shape, albedo  # [3] linear

    @property
    def beta(self) -> torch.Tensor:
        return self.shape.beta

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return self.shape.sdf(points)

    def __call__(self, points: torch.Tensor) -> FieldSample:
        sample = self.shape(points)
        return FieldSample(
            sdf=sample.sdf,
            albedo=self.albedo.to(sample.albedo).expand_as(sample.albedo),
            roughness=sample.roughness,
            metallic=torch.zeros_like(sample.metallic),
        )


class ToyTask:
    """The shape's black and white renders; any colour's views are a linear mix of the two."""

    def __init__(self, size: int) -> None:
        scene = sample_scene(SHAPE_SEED, VIEWS, size)
        environment = EnvironmentBank(("studio",)).pick(np.random.default_rng(SHAPE_SEED))
        options = RenderOptions(samples=48, importance_samples=48, surface_normals=True)
        self.shape = scene.object
        self.black, self.white = (
            render_viewset(Painted(self.shape, torch.full((3,), a)), scene.canonical_cameras, environment, options)
            for a in (0.0, 1.0)
        )
        self.points = surface_points(
            scene.object, torch.rand(8192, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
        )

    def viewset(self, colour: torch.Tensor) -> ViewSet:
        """The shape painted `colour` (linear [3]): exact views, and its truth painted the same."""
        black, white = self.black, self.white
        images = black.images + colour * (white.images - black.images)
        albedo = torch.where(black.masks[..., None] > 1e-3, colour, 0.0)  # straight, zero off the object
        buffers = dict(black.buffers, albedo=albedo)
        return ViewSet(black.cameras, images, black.masks, black.environment, buffers, Painted(self.shape, colour))


def loss_terms(
    model: LSRM, task: ToyTask, colours: torch.Tensor, batch: Batch, loss: str, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The loss of one batch ("total") and its terms, each a mean over the batch's objects."""
    prediction = model(batch.views, stages=1)
    terms: dict[str, torch.Tensor] = {}
    for b, field in enumerate(prediction.dense_fields):
        if loss == "surface":
            predicted = linear_to_srgb(field(task.points).albedo)
            mine = {"total": F.mse_loss(predicted, linear_to_srgb(colours[b]).expand_as(predicted))}
        else:
            mine = target_loss(field, batch.targets[b], FULL_LOSS, generator)
        for name, value in mine.items():
            terms[name] = terms.get(name, 0.0) + value / len(colours)
    return terms


@torch.no_grad()
def score(model: LSRM, task: ToyTask, colours: list[torch.Tensor]) -> dict:
    views = torch.arange(0, VIEWS, 2)  # 8 fixed input views
    true, predicted = [], []
    for colour in colours:
        viewset = task.viewset(colour).select(views)
        batch = sample_batch([viewset], len(views), 0, model.config.background, torch.Generator().manual_seed(0))
        field = model(batch.views, stages=1).dense_fields[0]
        predicted.append(linear_to_srgb(field(task.points).albedo).mean(0))
        true.append(linear_to_srgb(colour))
    return colour_scores(torch.stack(true).numpy(), torch.stack(predicted).numpy())


def train(task: ToyTask, config: ModelConfig, seed: int, report: list[int], loss: str = "surface") -> list[dict]:
    """Train a fresh model of `config` on the toy task; its scores at each step of `report` (0: before training)."""
    torch.manual_seed(seed)
    model = LSRM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    held_out = [random_colour(np.random.default_rng([seed, 99, k]), metal=False) for k in range(HELD_OUT)]
    rows, started, sums, since = [], time.perf_counter(), {}, 0

    def scored(step: int) -> None:
        """Scores now, and the mean of each loss term over the steps since the previous report."""
        means = {name: total / max(since, 1) for name, total in sums.items()}
        rows.append({"step": step, "loss": means.get("total", float("nan")), "terms": means})
        rows[-1].update(seconds=time.perf_counter() - started, **score(model, task, held_out))

    if 0 in report:
        scored(0)
    for step in range(1, max(report) + 1):
        colours = torch.stack([random_colour(rng, metal=False) for _ in range(2)])
        inputs = int(rng.integers(6, 9))
        targets = 4 if loss == "full" else 0
        batch = sample_batch([task.viewset(c) for c in colours], inputs, targets, config.background, generator)
        terms = loss_terms(model, task, colours, batch, loss, generator)
        optimizer.zero_grad()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        since += 1
        if step in report:
            scored(step)
            sums, since = {}, 0
    return rows


def _line(variant: str, row: dict) -> str:
    colour, hue = row["colour"], row["hue"]
    return (
        f"{variant:<6} {row['step']:>5} {row['seconds']:>7.0f} {row['loss']:>8.4f} {row['mean_colour_psnr']:>8.2f}"
        f" {colour['correlation']:>7.2f} {colour['slope']:>7.2f} {hue['correlation']:>7.2f} {hue['slope']:>7.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--report", type=int, nargs="+", default=[0, 100, 300, 600], help="steps to score at")
    parser.add_argument("--size", type=int, default=32, help="view size in pixels (a multiple of the patch size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=("surface", "full"), default="surface")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (more can be far slower on a shared CPU)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/colour_toy.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = ToyTask(args.size)
    print(
        f"colour toy: {args.model}, {args.size} px views, loss {args.loss}, seed {args.seed}, {args.threads} thread(s)"
    )
    print("model   step seconds     loss     PSNR    corr   slope   hue r   hue k")
    record = {"model": args.model, "size": args.size, "loss": args.loss, "seed": args.seed, "variants": {}}
    for variant in args.variants:
        config = dataclasses.replace(CONFIGS[args.model], image_size=args.size, **VARIANTS[variant])
        rows = train(task, config, args.seed, args.report, args.loss)
        for row in rows:
            print(_line(variant, row))
        record["variants"][variant] = rows
    print(
        "loss: mean since the previous report; PSNR: of the predicted mean colours (sRGB), where a constant guess "
        f"scores {rows[0]['constant_guess_psnr']:.2f} dB; r: correlation, k: slope (colour, and hue alone)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

"""How hard each training loss term pulls on the stage-1 transformer: the norm of its weighted gradient.

    python bench/loss_gradients.py [--checkpoint PATH] [--out bench/results/loss_gradients.json]

Adam moves every shared weight by the sum of all terms' gradients over their common scale, so a term
whose gradient is a hundred times smaller than the others' barely steers the transformer (the reason
colour did not learn in run 1, docs/TRAINING.md). Two procedural training objects, 8 inputs and 4 targets
of 64 px, one forward and backward per term, on the CPU; the loss weights are TrainConfig's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from backend.data.sources import FIRST_TRAINING_SEED, ground_truth_options, synthetic_viewset
from backend.data.views import EnvironmentBank, sample_batch
from backend.model.checkpoint import load_checkpoint
from backend.model.config import CONFIGS
from backend.model.lsrm import LSRM
from backend.render import RenderOptions
from backend.train import TrainConfig, loss_config, target_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="weights to measure (default: a fresh tiny model)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/loss_gradients.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint).float() if args.checkpoint else LSRM(CONFIGS["tiny"])
    config = TrainConfig(out=Path("."), normal_steps=1)
    losses = loss_config(config, step=0, total=1)  # the last step: every term is on
    losses = type(losses)(**{**losses.__dict__, "render": RenderOptions(samples=24, importance_samples=12)})
    cpu, bank = torch.device("cpu"), EnvironmentBank()
    viewsets = [
        synthetic_viewset(FIRST_TRAINING_SEED + k, 12, 64, bank, cpu, ground_truth_options(cpu)) for k in (0, 1)
    ]
    generator = torch.Generator().manual_seed(0)
    batch = sample_batch(viewsets, 8, 4, True, generator)
    prediction = model(batch.views, stages=1)
    terms: dict[str, torch.Tensor] = {}
    for field, target in zip(prediction.fields, batch.targets, strict=True):
        out = target_loss(field, target, losses, generator)
        for name, value in out.items():
            terms[name] = terms.get(name, 0.0) + value / len(batch.targets)
    weights = {
        "colour": losses.colour,
        "mask": losses.mask,
        "eikonal": losses.eikonal,
        "depth": losses.depth,
        "normal": losses.normal,
        "sdf": losses.sdf,
    }
    shared = [p for name, p in model.named_parameters() if name.startswith("dense.")]
    rows = {}
    print(f"{'term':<20} {'loss':>8} {'weighted gradient':>18}")
    for name, value in terms.items():
        if name == "total":
            continue
        weight = weights.get(name, losses.surface_material if name.startswith("surface_") else losses.material)
        grads = torch.autograd.grad(weight * value, shared, retain_graph=True, allow_unused=True)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))
        rows[name] = {"loss": float(value.detach()), "weight": weight, "gradient_norm": norm}
        print(f"{name:<20} {float(value.detach()):8.4f} {norm:18.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "terms": rows}, indent=2))


if __name__ == "__main__":
    main()

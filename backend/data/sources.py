"""Where training views come from: procedural objects, furniture meshes, or a folder of users' bundles.

Each source is a function seed -> `ViewSet`, so the scene pool treats them alike. Procedural objects
and furniture are rendered by our renderer under a random studio world at a random rotation; a folder
source cycles through bundles that already hold renders (with ground-truth material images where
the bundle has them) and the environment they were lit by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..bundle import TRANSFORMS, canonical_normalisation, load_bundle
from ..errors import InputError
from ..render import RenderOptions
from ..shading import Environment
from .synthetic import sample_scene
from .views import EnvironmentBank, ViewSet, render_viewset

SOURCES = ("synthetic", "furniture", "mixed", "folder")
# Seeds of procedural training objects start here; lower seeds (the demo, tests, the development set's
# procedural objects, evaluation scenes) are never trained on.
FIRST_TRAINING_SEED = 1_000_000


def ground_truth_options(device: torch.device) -> RenderOptions:
    """How ground-truth views are rendered: one normal per ray at the surface, big chunks on a GPU."""
    return RenderOptions(
        samples=48, importance_samples=48, chunk_rays=65536 if device.type == "cuda" else 8192, surface_normals=True
    )


def synthetic_viewset(
    seed: int, views: int, resolution: int, bank: EnvironmentBank, device: torch.device, options: RenderOptions
) -> ViewSet:
    """A procedural object from `views` seeded cameras under a seeded studio world and rotation."""
    scene = sample_scene(seed, views, resolution, device)
    environment = bank.pick(np.random.default_rng([seed, 7]))
    return render_viewset(
        scene.object, scene.canonical_cameras, environment, options, scene.object, f"synthetic {seed}"
    )


def folder_viewsets(root: Path, resolution: int, device: torch.device) -> list[ViewSet]:
    """Every bundle folder under `root` (itself one, or its subfolders), resized to `resolution` squares.

    Each bundle needs an `environment` (training shades under the lighting the views were rendered
    with); ground-truth images (albedo, roughness, metallic, normal) are used where present.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder '{root}' does not exist; give a folder of bundles")
    folders = [root] if (root / TRANSFORMS).is_file() else sorted(p.parent for p in root.glob(f"*/{TRANSFORMS}"))
    if not folders:
        raise InputError(f"dataset folder '{root}' holds no bundles (no */{TRANSFORMS}); write bundles into it first")
    viewsets = []
    for folder in folders:
        bundle = load_bundle(folder, load_ground_truth=True)
        if bundle.environment is None:
            raise InputError(f"bundle '{folder}' names no environment; training needs the lighting of its renders")
        if bundle.images.shape[1] != bundle.images.shape[2]:
            raise InputError(f"bundle '{folder}' has non-square images; training bundles need square views")
        spec = bundle.environment
        environment = Environment.load(spec.path, spec.rotation_z, spec.strength, device)
        cameras = canonical_normalisation(bundle).cameras_to_canonical(bundle.cameras)
        buffers = {k: v for k, v in bundle.ground_truth.items() if k in ("albedo", "roughness", "metallic", "normal")}
        viewsets.append(
            _resized(
                ViewSet(cameras, bundle.images, bundle.masks, environment, buffers, name=folder.name), resolution
            ).to(device)
        )
    return viewsets


def _resized(viewset: ViewSet, size: int) -> ViewSet:
    """A ViewSet resampled to size x size pixels (normals renormalised, cameras rescaled)."""
    height, width = viewset.images.shape[1:3]
    if (height, width) == (size, size):
        return viewset

    def resample(x: torch.Tensor) -> torch.Tensor:
        channels_last = x if x.ndim == 4 else x[..., None]
        flat = channels_last.permute(0, 3, 1, 2)
        out = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = out.permute(0, 2, 3, 1)
        return out if x.ndim == 4 else out[..., 0]

    buffers = {key: resample(value) for key, value in viewset.buffers.items()}
    if "normal" in buffers:
        buffers["normal"] = F.normalize(buffers["normal"], dim=-1) * (
            buffers["normal"].norm(dim=-1, keepdim=True) > 0.5
        )
    return ViewSet(
        viewset.cameras.resized(size, size),
        resample(viewset.images),
        resample(viewset.masks),
        viewset.environment,
        buffers,
        viewset.truth,
        viewset.name,
    )


def make_source(
    kind: str,
    views: int,
    resolution: int,
    device: torch.device,
    bank: EnvironmentBank,
    folder: Path | None = None,
    furniture_dir: Path | None = None,
) -> Callable[[int], ViewSet]:
    """seed -> ViewSet for one of `SOURCES`; "mixed" alternates procedural objects and furniture."""
    options = ground_truth_options(device)
    if kind == "synthetic":
        return lambda seed: synthetic_viewset(seed, views, resolution, bank, device, options)
    if kind == "folder":
        if folder is None:
            raise InputError("--data folder needs --data-dir, the folder that holds the bundles")
        viewsets = folder_viewsets(folder, resolution, device)
        return lambda seed: viewsets[seed % len(viewsets)]
    from .furniture import FurnitureLibrary

    library = FurnitureLibrary(furniture_dir, device)

    def furniture(seed: int) -> ViewSet:
        return library.viewset(seed, views, resolution, bank, options)

    if kind == "furniture":
        return furniture
    if kind == "mixed":
        return lambda seed: (
            furniture(seed) if seed % 2 else synthetic_viewset(seed, views, resolution, bank, device, options)
        )
    raise InputError(f"unknown data source '{kind}'; use one of {', '.join(SOURCES)}")


@dataclass(frozen=True)
class SourceSpec:
    """`make_source`'s arguments as plain values, so another process (the scene producer) can build the
    same source: a closure over a device, a bank and a furniture library does not pickle, this does."""

    kind: str
    views: int
    resolution: int
    device: str
    environments: tuple[str, ...]
    folder: Path | None = None
    furniture_dir: Path | None = None

    def bank(self) -> EnvironmentBank:
        return EnvironmentBank(self.environments, self.device)

    def build(self, bank: EnvironmentBank) -> Callable[[int], ViewSet]:
        """seed -> ViewSet, lit by `bank`'s worlds."""
        device = torch.device(self.device)
        return make_source(self.kind, self.views, self.resolution, device, bank, self.folder, self.furniture_dir)

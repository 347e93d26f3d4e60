"""Training views: rendered objects with ground truth, a pool of them on the device, and batches drawn from it.

A `ViewSet` is one object seen from many cameras (canonical frame, OpenCV): straight linear colours,
masks, ray-distance depth, normals and material maps, the environment it was lit by and, when known,
its true field. Every source (procedural objects, furniture meshes, users' bundle folders) yields
ViewSets, and `sample_batch` draws the same kind of batch from any of them: a random number of input
views (with background images for the inverse-rendering variant) and separate target views.

Rendering a ViewSet costs far more than one training step, so training keeps a `ScenePool` of them on
the GPU and replaces a few each step; which scene sits in which slot is a pure function of the step,
so a resumed run rebuilds exactly the pool it had.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..cameras import Cameras, image_rays
from ..errors import InputError
from ..field import SurfaceField
from ..model.lsrm import Views
from ..render import RenderOptions, render_views
from ..shading import BUILTIN_ENVIRONMENTS, Environment, builtin_environment

BUFFERS = ("albedo", "roughness", "metallic", "depth", "normal")


@dataclass
class ViewSet:
    """One object's views: cameras canonical; images [V, H, W, 3] straight linear; masks [V, H, W];
    buffers: the ground-truth maps of `BUFFERS` that exist (straight values, zero off the object)."""

    cameras: Cameras
    images: Tensor
    masks: Tensor
    environment: Environment
    buffers: dict[str, Tensor] = field(default_factory=dict)
    truth: SurfaceField | None = None
    name: str = ""

    def __len__(self) -> int:
        return len(self.cameras)

    def select(self, index: Tensor) -> ViewSet:
        """The views at `index` (a 1-D tensor of view numbers)."""
        buffers = {key: value[index.to(value.device)] for key, value in self.buffers.items()}
        pick = index.to(self.images.device)
        return ViewSet(
            self.cameras[index.to(self.cameras.device)],
            self.images[pick],
            self.masks[pick],
            self.environment,
            buffers,
            self.truth,
            self.name,
        )

    def to(self, device: torch.device | str) -> ViewSet:
        """The views' tensors on `device` (the environment and truth stay where they were made)."""
        buffers = {key: value.to(device) for key, value in self.buffers.items()}
        cameras, images, masks = self.cameras.to(device), self.images.to(device), self.masks.to(device)
        return ViewSet(cameras, images, masks, self.environment, buffers, self.truth, self.name)

    def background(self) -> Tensor:
        """What each camera sees of the environment alone, [V, H, W, 3] (LIRM's background input)."""
        _, directions = image_rays(self.cameras)
        return self.environment.radiance(directions)


@torch.no_grad()
def render_viewset(
    surface: SurfaceField,
    cameras: Cameras,
    environment: Environment,
    options: RenderOptions | None = None,
    truth: SurfaceField | None = None,
    name: str = "",
) -> ViewSet:
    """Render a ground-truth field through canonical cameras into a ViewSet (straight values, like photos)."""
    output = render_views(surface, cameras, environment, options)
    alpha = output.alpha
    hit = alpha > 1e-3
    scale = 1.0 / alpha.clamp_min(1e-3)

    def straight(value: Tensor) -> Tensor:
        return torch.where(hit, value * scale, 0.0).clamp(0.0, None)

    buffers = {
        "albedo": straight(output.albedo).clamp(0.0, 1.0),
        "roughness": straight(output.roughness)[..., 0].clamp(0.0, 1.0),
        "metallic": straight(output.metallic)[..., 0].clamp(0.0, 1.0),
        "depth": torch.where(hit, output.depth, 0.0)[..., 0],
        "normal": torch.where(hit, output.normal, 0.0),
    }
    images = straight(output.rgb)
    return ViewSet(cameras, images, alpha[..., 0].clamp(0.0, 1.0), environment, buffers, truth, name)


# ----------------------------------------------------------------------------- environments


class EnvironmentBank:
    """Studio worlds handed out under random rotations; each is loaded once per process and device, and
    its split-sum tables are built once and shared by all rotated copies."""

    _loaded: ClassVar[dict[tuple[str, str], Environment]] = {}

    def __init__(self, names: Sequence[str] = BUILTIN_ENVIRONMENTS, device: torch.device | str = "cpu") -> None:
        unknown = sorted(set(names) - set(BUILTIN_ENVIRONMENTS))
        if not names or unknown:
            raise InputError(f"unknown environments {unknown}; use some of {', '.join(BUILTIN_ENVIRONMENTS)}")
        self.names, self.device = tuple(names), torch.device(device)

    def load(self, name: str) -> Environment:
        key = (name, str(self.device))
        if key not in self._loaded:
            environment = Environment.load(builtin_environment(name), device=self.device)
            probe = torch.tensor([[0.0, 0.0, 1.0]], device=self.device)
            environment.irradiance(probe)  # builds the tables now, before any copy is made
            self._loaded[key] = environment
        return self._loaded[key]

    def pick(self, rng: np.random.Generator) -> Environment:
        """A random world under a random rotation about Z."""
        name = self.names[int(rng.integers(len(self.names)))]
        return self.rotated(name, float(rng.uniform(0.0, 2.0 * math.pi)))

    def rotated(self, name: str, rotation_z: float) -> Environment:
        """World `name` turned by `rotation_z` radians (a copy sharing the loaded image and tables)."""
        chosen = copy.copy(self.load(name))
        chosen.rotation_z = rotation_z
        return chosen

    def name_of(self, environment: Environment) -> str:
        """Which of this bank's worlds `environment` is a rotated copy of."""
        for name in self.names:
            if self.load(name).image is environment.image:
                return name
        raise ValueError("the environment is none of this bank's worlds")


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Inputs for the model and, per object, the target views its prediction is rendered against."""

    views: Views
    targets: list[ViewSet]

    @property
    def size(self) -> int:
        return len(self.targets)


def sample_batch(
    viewsets: list[ViewSet], inputs: int, targets: int, background: bool, generator: torch.Generator
) -> Batch:
    """Disjoint random input and target views of each object (all objects: the same counts and size)."""
    chosen_inputs, chosen_targets = [], []
    for viewset in viewsets:
        if len(viewset) < inputs + targets:
            raise ValueError(f"{viewset.name or 'a view set'} has {len(viewset)} views, fewer than {inputs + targets}")
        order = torch.randperm(len(viewset), generator=generator)
        chosen_inputs.append(viewset.select(order[:inputs]))
        chosen_targets.append(viewset.select(order[inputs : inputs + targets]))
    views = Views(
        images=torch.stack([v.images for v in chosen_inputs]),
        masks=torch.stack([v.masks for v in chosen_inputs]),
        cameras=[v.cameras for v in chosen_inputs],
        background=torch.stack([v.background() for v in chosen_inputs]) if background else None,
    )
    return Batch(views, chosen_targets)


class ScenePool:
    """`size` ViewSets from `make(seed)`; every `every` steps one slot is re-made, round robin.

    Slot s holds the scene of seed `base + generation * size + s`, where its generation is how many times
    the rotation has passed it by that step: the pool at any step is known without replaying the run.
    """

    def __init__(self, make: Callable[[int], ViewSet], size: int, every: int, base: int) -> None:
        if size < 1 or every < 1:
            raise ValueError("a scene pool needs at least one slot and a refresh period of at least one step")
        self.make, self.size, self.every, self.base = make, size, every, base
        self.slots: list[ViewSet] = []
        self.generations: list[int] = []

    def generation(self, slot: int, step: int) -> int:
        made = step // self.every  # slots re-made before this step
        return made // self.size + (1 if slot < made % self.size else 0)

    def seed(self, slot: int, step: int) -> int:
        return self.base + self.generation(slot, step) * self.size + slot

    def first_seed(self, step: int) -> int:
        """The lowest seed in the pool at `step`: the pool holds it and the next `size - 1` seeds, and each
        later refresh makes the next seed up, so a producer can render them ahead in that order."""
        return self.base + step // self.every

    def at_step(self, step: int) -> list[ViewSet]:
        """The pool as it is at `step` (making only the slots that differ, lowest seed first)."""
        if not self.slots:
            self.slots, self.generations = [None] * self.size, [-1] * self.size  # type: ignore[list-item]
        for slot in sorted(range(self.size), key=lambda s: self.seed(s, step)):
            generation = self.generation(slot, step)
            if self.generations[slot] != generation:
                self.slots[slot] = self.make(self.seed(slot, step))
                self.generations[slot] = generation
        return self.slots

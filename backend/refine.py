"""Engine B: test-time refinement of the field against the input views (DESIGN §4).

The same `FeatureField` the transformer predicts is optimised directly, through the one renderer
(`render.render_rays`), against the views' colours and masks:

1. "visual hull": carve the masks into an occupancy grid, turn it into a signed distance with a
   distance transform, and fit the field to it briefly (skipped when a starting field is given);
2. "coarse": the dense feature grid, decoder heads and VolSDF beta, against the images;
3. "fine": the sparse high-resolution grid is allocated only in voxels near the current surface
   (LSRM's coarse-to-fine idea, per object) and trained together with the rest.

Losses: mask (rendered opacity vs the mask), photometric (premultiplied linear RGB, clipped at 1 as
8-bit inputs are, vs image x mask),
eikonal (|grad sdf| = 1 along rays and in the box), smoothness (normals of nearby surface points
agree) and light material regularisers (materials vary smoothly; the LIRM offset stays small).
Lighting is the known environment when given, else a low-resolution equirectangular map estimated
jointly (its split-sum tables are differentiable with respect to its pixels). Everything is seeded:
the same inputs and config give the same field on the CPU.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from .cameras import Cameras, image_rays, visual_hull
from .colour import linear_to_srgb
from .errors import InputError
from .field import FeatureField, FieldConfig, grid_indices_and_weights
from .progress import Progress, no_progress
from .render import RenderOptions, RenderOutput, render_rays
from .shading import Environment

log = logging.getLogger(__name__)


class Cancelled(Exception):  # noqa: N818 (the name the service and CLI catch; it is not an error)
    """Raised when the caller's `should_stop()` says so; the partial field is discarded."""


class DivergenceError(RuntimeError):
    """The optimisation produced non-finite values (it diverged); nothing it made may be exported."""


@dataclass(frozen=True)
class LossWeights:
    mask: float = 0.5  # binary cross-entropy of rendered opacity against the mask
    # The same cross-entropy for the SDF's zero level set (the surface that becomes the mesh): a ray covers its
    # pixel when its smallest SDF sample is below 0, softened by beta. Without it the exported surface sits
    # inside the rendered silhouette, which a soft VolSDF density widens by a few beta at grazing rays.
    silhouette: float = 0.0
    photometric: float = 1.0  # L1 of premultiplied linear RGB against image x mask
    eikonal: float = 0.2  # (|grad sdf| - 1)^2 along the rays and at random points in the box
    smoothness: float = 0.3  # squared difference of unit normals at nearby surface points
    material: float = 0.01  # L1 difference of albedo, roughness, metallic at nearby surface points
    offset: float = 0.1  # L1 of LIRM's effective offset: opacity should come from the surface itself
    grid_tv: float = 0.0  # squared differences of neighbouring dense-grid features: no voxel-scale bumps
    # Weak material priors at surface points (L1): metal is rare and glossy highlights are easy to overfit, so
    # metallic leans to 0 and roughness to 1 unless the images pay for something else.
    metallic_prior: float = 0.01
    roughness_prior: float = 0.005


@dataclass(frozen=True)
class RefineConfig:
    """Every number of one refinement. Presets (backend/presets.py) pick these per budget."""

    seed: int = 0
    # The field.
    channels: int = 16
    dense_resolution: int = 48
    sparse_resolution: int = 128
    hidden: int = 64
    hidden_layers: int = 2
    geometry_channels: int = 0  # FieldConfig.geometry_channels: 0 shares every channel between shape and materials
    beta_init: float = 0.03  # canonical units; wide at first so gradients reach the surface from afar
    # Beta is learned, but under an upper bound that falls geometrically from beta_init to this over the coarse
    # and fine stages (None: no bound), so the surface ends sharp instead of as a soft halo.
    final_beta: float | None = 0.01
    init_std: float = 0.1  # std of the random initial grid features
    initial_roughness: float = 0.8  # materials start as a rough dielectric ...
    initial_metallic: float = 0.01  # ... (sigmoid heads: their biases are set to these values' logits)
    # The visual-hull start.
    hull_resolution: int = 64
    hull_mask_threshold: float = 0.5
    prefit_steps: int = 150
    prefit_points: int = 8192
    prefit_near_surface: float = 0.5  # share of pre-fit points drawn next to the hull's surface
    prefit_learning_rate: float = 1e-2
    # The two image stages.
    coarse_steps: int = 300
    fine_steps: int = 300
    fine_band: float | None = None  # canonical units around the surface to allocate; None: the field's default
    rays_per_batch: int = 1024
    foreground_fraction: float = 0.7  # share of each batch's rays through masked pixels
    samples: int = 32  # uniform samples per ray
    importance_samples: int = 32
    # Shading normals per sample (True: one SDF gradient per ray at the rendered surface point, faster). Per
    # sample fits far better: the demo's training PSNR 31.5 vs 21.6 dB, relit PSNR-L 23.5 vs 17.6 dB (issue 3).
    surface_normals: bool = False
    photometric_srgb: bool = True  # the photometric L1 on sRGB-encoded colours (how people and PSNR-L see them)
    grid_learning_rate: float = 5e-3  # the dense feature grid
    # The fine grid: much lower. Adam moves every voxel by about the learning rate whatever its gradient's size,
    # and a fine voxel sees few rays per step, so at 2e-3 the fine stage added noise (worse normals, a worse
    # photometric fit than the coarse stage left; issue 3).
    sparse_learning_rate: float = 2e-4
    network_learning_rate: float = 1e-2  # decoder heads and beta
    final_learning_rate_fraction: float = 0.1  # each stage (the pre-fit too) decays exponentially to this share
    # Each stage's rates ramp up linearly over this many first steps (0: none). A stage starts a fresh Adam, whose
    # first steps move every value by about the rate: on the barrel that tripled the normals' disagreement within
    # 5 coarse steps, and 25 warm-up steps kept it flat (CPU; docs/REFINEMENT.md 3b). Off until a GPU run decides.
    warmup_steps: int = 0
    weights: LossWeights = field(default_factory=LossWeights)
    regulariser_points: int = 1024  # random box points for the eikonal term, per step
    smoothness_distance: float = 0.03  # canonical units: pairs span a few fine voxels, so voxel-scale bumps are seen
    # The estimated environment (used only when no known lighting is given).
    environment_height: int = 8  # equirectangular [h, 2h]: low frequency by construction
    environment_learning_rate: float = 2e-2
    assumed_albedo: float = 0.5  # initial lighting level = mean foreground colour / this (fixes the scale)
    # Robustness: a step whose loss or gradients are not finite is skipped (zero gradients); the host reads
    # the count and checks the parameters every `check_every` steps only (each read is a device sync).
    check_every: int = 50
    # Record each image stage's step once as a CUDA graph and replay it (CUDA with known lighting only): 2.4x faster
    # on an H200. On in the GPU presets; with the gradient bound the barrel no longer collapses (REFINEMENT.md 3b).
    cuda_graphs: bool = False
    max_skipped_fraction: float = 0.1  # more skipped steps than this share of a stage is a divergence
    max_gradient_norm: float = 1.0  # a step's gradients are scaled down to this total norm (usual: 0.05-0.5)
    # Evaluation.
    psnr_rays: int = 8192  # fixed seeded subset of training pixels the report's PSNR is measured on

    def __post_init__(self) -> None:
        if not self.max_gradient_norm > 0.0:
            raise ValueError(f"max_gradient_norm must be positive, got {self.max_gradient_norm}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be 0 or more, got {self.warmup_steps}")


@dataclass
class StageReport:
    steps: int
    seconds: float
    losses: dict[str, float]  # each term's mean over the stage's last tenth of steps
    graphed: bool = False  # whether its steps were replayed from a CUDA graph (RefineConfig.cuda_graphs)


@dataclass
class RefineReport:
    stages: dict[str, StageReport]
    training_psnr: float  # dB, linear RGB clipped at 1 vs image x mask, on `psnr_rays` foreground pixels
    sparse_voxels: int
    surface_coverage: float  # share of those pixels whose ray meets the SDF's zero level set (the mesh)
    lighting: str  # "known" or "estimated"
    seconds: float
    skipped_steps: int = 0  # steps whose loss or gradients were not finite (their update was skipped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stages": {name: vars(stage) for name, stage in self.stages.items()},
            "training_psnr": self.training_psnr,
            "sparse_voxels": self.sparse_voxels,
            "surface_coverage": self.surface_coverage,
            "lighting": self.lighting,
            "seconds": self.seconds,
            "skipped_steps": self.skipped_steps,
        }


@dataclass
class RefineResult:
    field: FeatureField
    environment: Environment  # the lighting the field was fitted under (known, or the estimate)
    report: RefineReport


# ---------------------------------------------------------------------------------------------
# Training data: every pixel as a ray, with its premultiplied colour and mask


@dataclass
class _Rays:
    origins: torch.Tensor  # [P, 3] canonical
    directions: torch.Tensor  # [P, 3] unit
    colours: torch.Tensor  # [P, 3] linear image x mask
    masks: torch.Tensor  # [P]
    foreground: torch.Tensor  # [F] indices of pixels with mask >= 0.5

    def __len__(self) -> int:
        return len(self.masks)

    def sample(self, count: int, foreground_fraction: float) -> torch.Tensor:
        """Indices of a batch: a share through the object, the rest anywhere (the mask loss needs both)."""
        on_object = round(count * foreground_fraction) if len(self.foreground) else 0
        device = self.masks.device
        picked = self.foreground[torch.randint(len(self.foreground), (on_object,), device=device)]
        anywhere = torch.randint(len(self), (count - on_object,), device=device)
        return torch.cat([picked, anywhere])


def _training_rays(cameras: Cameras, images: torch.Tensor, masks: torch.Tensor) -> _Rays:
    origins, directions = image_rays(cameras)
    masks = masks.reshape(-1).float()
    return _Rays(
        origins=origins.reshape(-1, 3),
        directions=directions.reshape(-1, 3),
        colours=(images.reshape(-1, 3) * masks[:, None]).float(),
        masks=masks,
        foreground=(masks >= 0.5).nonzero()[:, 0],
    )


# ---------------------------------------------------------------------------------------------
# Visual hull start


def visual_hull_sdf(cameras: Cameras, masks: torch.Tensor, resolution: int, threshold: float = 0.5) -> torch.Tensor:
    """Signed distance [R, R, R] (canonical units, indexed [x, y, z], cell-centred) to the masks' visual hull.

    cameras are in the canonical frame; the grid covers the box [-1, 1]^3.
    """
    box = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    occupancy = visual_hull(cameras, masks, box, resolution, threshold).cpu().numpy()
    if not occupancy.any():
        raise InputError(
            "the masks carve away the whole canonical box (their visual hull is empty); check that every view's "
            "mask covers the object and that the camera poses are right."
        )
    # Distances between voxel centres; the surface lies half a voxel between an inside and an outside centre.
    outside = distance_transform_edt(~occupancy) - 0.5
    inside = distance_transform_edt(occupancy) - 0.5
    sdf = np.where(occupancy, -inside, outside) * (2.0 / resolution)
    return torch.from_numpy(sdf.astype(np.float32))


def _trilinear(grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear read of a cell-centred scalar grid [R, R, R] over [-1, 1]^3 at points [N, 3]."""
    resolution = grid.shape[0]
    indices, weights = grid_indices_and_weights(points, resolution)
    linear = (indices[..., 0] * resolution + indices[..., 1]) * resolution + indices[..., 2]
    return (grid.reshape(-1)[linear] * weights).sum(-1)


def _decayed(rate: float, index: int, steps: int, config: RefineConfig) -> float:
    """Every stage's learning rate at step `index`: exponential decay to `final_learning_rate_fraction` of `rate`,
    after a linear ramp over the first `warmup_steps`.

    Adam moves every parameter by about its learning rate per step whatever the gradient's size, so at a
    constant rate a stage ends jittering by that much; in a feature grid the jitter bends the SDF's gradient by
    rate / voxel, worse on finer grids (the visual-hull pre-fit on dense 64^3, docs/REFINEMENT.md 3a).
    """
    ramp = min(1.0, (index + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    return ramp * rate * config.final_learning_rate_fraction ** (index / max(steps, 1))


def _prefit(
    model: FeatureField, sdf: torch.Tensor, config: RefineConfig, step: Callable[[int, int], None]
) -> dict[str, float]:
    """Fit the field's SDF to a grid of signed distances (L1), half the points next to its surface."""
    resolution = sdf.shape[0]
    voxel = 2.0 / resolution
    near = (sdf.abs() < 2.0 * voxel).nonzero().to(sdf.device)  # voxels the surface runs through
    optimiser = torch.optim.Adam(model.parameters(), lr=config.prefit_learning_rate)
    near_count = round(config.prefit_points * config.prefit_near_surface) if len(near) else 0
    loss = torch.zeros(())
    for index in range(config.prefit_steps):
        step(index, config.prefit_steps)
        optimiser.param_groups[0]["lr"] = _decayed(config.prefit_learning_rate, index, config.prefit_steps, config)
        chosen = near[torch.randint(len(near), (near_count,), device=sdf.device)]
        jitter = torch.rand(near_count, 3, device=sdf.device)
        near_points = -1.0 + (chosen.float() + jitter) * voxel
        box_points = torch.rand(config.prefit_points - near_count, 3, device=sdf.device) * 2.0 - 1.0
        points = torch.cat([near_points, box_points])
        loss = (model.sdf(points) - _trilinear(sdf, points)).abs().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return {"sdf l1": float(loss.detach())}


def initial_field(config: RefineConfig, device: torch.device | str) -> FeatureField:
    """A fresh FeatureField of the config's sizes, materials biased to a rough dielectric."""
    model = FeatureField(
        FieldConfig(
            channels=config.channels,
            dense_resolution=config.dense_resolution,
            sparse_resolution=config.sparse_resolution,
            hidden=config.hidden,
            hidden_layers=config.hidden_layers,
            geometry_channels=config.geometry_channels,
            beta_init=config.beta_init,
            init_std=config.init_std,
        )
    ).to(device)
    with torch.no_grad():
        bias = model.decoder.material.bias  # albedo (3), roughness, metallic through a sigmoid
        bias[3] = math.log(config.initial_roughness / (1.0 - config.initial_roughness))
        bias[4] = math.log(config.initial_metallic / (1.0 - config.initial_metallic))
    return model


# ---------------------------------------------------------------------------------------------
# Lighting


class EstimatedEnvironment(nn.Module):
    """A learnable low-resolution equirectangular environment (positive through exp)."""

    def __init__(self, height: int, level: float) -> None:
        super().__init__()
        self.log_image = nn.Parameter(torch.full((height, 2 * height, 3), math.log(max(level, 1e-4))))

    def environment(self) -> Environment:
        return Environment(self.log_image.exp())


# ---------------------------------------------------------------------------------------------
# Losses


def _clipped(out: RenderOutput) -> torch.Tensor:
    """Premultiplied colour as an 8-bit input image holds it: the straight colour clipped at 1, times alpha."""
    return torch.minimum(out.rgb, out.alpha)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _losses(
    model: FeatureField,
    rays: _Rays,
    batch: torch.Tensor,
    environment: Environment,
    config: RefineConfig,
    options: RenderOptions,
) -> dict[str, torch.Tensor]:
    origins, directions = rays.origins[batch], rays.directions[batch]
    out = render_rays(model, origins, directions, environment, options)
    mask = rays.masks[batch, None]
    encode = linear_to_srgb if config.photometric_srgb else _identity
    alpha = out.alpha.clamp(1e-4, 1.0 - 1e-4)
    terms = {
        "mask": F.binary_cross_entropy(alpha, mask),
        "photometric": (encode(_clipped(out)) - encode(rays.colours[batch])).abs().mean(),
    }
    if config.weights.silhouette:
        logits = -out.min_sdf / model.beta.detach()
        terms["silhouette"] = F.binary_cross_entropy_with_logits(logits, mask)

    # Regularisers at pairs of points scattered around each ray's rendered surface point, and at random
    # points in the box (the eikonal term must hold where no ray has looked yet). Rays that hit nothing
    # get weight 0 instead of being indexed away, so the step needs no host sync and has fixed shapes.
    solid = ((out.alpha > 0.5) & (mask > 0.5)).float()[:, 0]
    surface = (origins + directions * out.depth).detach()
    pairs = surface.repeat(2, 1) + torch.randn(2 * len(surface), 3, device=surface.device) * config.smoothness_distance
    box = torch.rand(config.regulariser_points, 3, device=surface.device) * 2.0 - 1.0
    points = torch.cat([pairs, box]).requires_grad_(True)
    sample = model(points)
    (gradient,) = torch.autograd.grad(sample.sdf.sum(), points, create_graph=True)
    terms["eikonal"] = 0.5 * (((gradient.norm(dim=-1) - 1.0) ** 2).mean() + out.eikonal.mean())
    count = len(surface)
    share = solid / solid.sum().clamp_min(1.0)
    normals = F.normalize(gradient[: 2 * count], dim=-1)
    terms["smoothness"] = (share * ((normals[:count] - normals[count:]) ** 2).sum(-1)).sum()
    materials = torch.cat([sample.albedo, sample.roughness[:, None], sample.metallic[:, None]], dim=-1)
    terms["material"] = (share * (materials[:count] - materials[count : 2 * count]).abs().mean(-1)).sum()
    terms["offset"] = (share * sample.offset[: 2 * count].abs().reshape(2, count).mean(0)).sum()
    terms["metallic_prior"] = (share * sample.metallic[: 2 * count].reshape(2, count).mean(0)).sum()
    terms["roughness_prior"] = (share * (1.0 - sample.roughness[: 2 * count]).reshape(2, count).mean(0)).sum()
    if config.weights.grid_tv:
        terms["grid_tv"] = _total_variation(model.dense)
    return terms


def _total_variation(grid: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring voxels of a feature grid [C, X, Y, Z] along each axis."""
    return sum((grid.diff(dim=axis) ** 2).mean() for axis in (1, 2, 3)) / 3.0


def _guard_gradients(parameters: list[torch.Tensor], loss: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Zero every gradient when the loss or any gradient is not finite, else scale them down to a total norm of at
    most `max_norm`; returns whether the step was finite (0-d bool) on the device.

    No host sync: a bad step becomes a step with zero gradients (Adam's moments carry it), and the caller counts
    the flags and reads the count only every few steps. The bound is for spikes: on the barrel one step's gradient
    was 10^5 times the usual (in the photometric term), and Adam turned it into a run of full-rate steps that
    erased the surface (docs/REFINEMENT.md 3b). Later steps have norms of 0.05-0.5; a stage's first steps can
    exceed 1 and are tempered too.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.stack(torch._foreach_norm(grads)).norm()
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    torch._foreach_mul_(grads, (max_norm / norm.clamp_min(1e-12)).clamp(max=1.0))
    for grad in grads:
        grad.masked_fill_(~finite, 0.0)  # NaN times anything stays NaN
    return finite


def _weighted(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    return sum(getattr(weights, name) * value for name, value in terms.items())


# ---------------------------------------------------------------------------------------------
# The engine


def refine(
    cameras: Cameras,
    images: torch.Tensor,
    masks: torch.Tensor,
    config: RefineConfig | None = None,
    *,
    environment: Environment | None = None,
    start: FeatureField | None = None,
    progress: Progress = no_progress,
    should_stop: Callable[[], bool] | None = None,
) -> RefineResult:
    """Optimise a FeatureField so that rendering it through `cameras` reproduces the images and masks.

    cameras: canonical frame (the box [-1, 1]^3 holds the object), on the device to run on.
    images [V, H, W, 3] linear with straight alpha, masks [V, H, W] in [0, 1].
    environment: the known lighting (world orientation; the canonical frame shares the world's axes),
    or None to estimate a low-frequency one jointly. start: a field to refine instead of the visual
    hull (e.g. Engine A's prediction); it is modified in place. progress gets ("visual hull" | "coarse"
    | "fine", fraction); should_stop is polled every step and `Cancelled` is raised when it says so.
    """
    config = config or RefineConfig()
    device = cameras.device
    begin = time.perf_counter()
    forked = [device] if device.type == "cuda" else []
    with _deterministic(device.type == "cpu"), torch.random.fork_rng(devices=forked):
        torch.manual_seed(config.seed)
        images, masks = images.to(device), masks.to(device)
        rays = _training_rays(cameras, images, masks)
        if len(rays.foreground) == 0:
            raise InputError("every mask is empty, so there is no object to reconstruct; give views with alpha masks.")
        stages: dict[str, StageReport] = {}

        def checkpoint(stage: str, index: int, total: int) -> None:
            if should_stop is not None and should_stop():
                raise Cancelled(f"refinement cancelled during '{stage}'")
            progress(stage, index / max(total, 1))

        model = start
        if model is None:
            clock = time.perf_counter()
            model = initial_field(config, device)
            sdf = visual_hull_sdf(cameras, masks, config.hull_resolution, config.hull_mask_threshold).to(device)
            losses = _prefit(model, sdf, config, lambda i, n: checkpoint("visual hull", i, n))
            stages["visual hull"] = StageReport(config.prefit_steps, time.perf_counter() - clock, losses)
            progress("visual hull", 1.0)

        estimated = None
        if environment is None:
            level = float(rays.colours[rays.foreground].mean()) / config.assumed_albedo
            estimated = EstimatedEnvironment(config.environment_height, level).to(device)
        options = RenderOptions(
            samples=config.samples,
            importance_samples=config.importance_samples,
            chunk_rays=config.rays_per_batch,
            jitter=True,
            surface_normals=config.surface_normals,
        )

        skipped = torch.zeros((), dtype=torch.long, device=device)  # on the device: read every check_every steps

        beta_bound = _beta_bound(config, model.config.beta_min)

        # Only with known lighting: an estimated environment rebuilds its tables every step, with data-dependent
        # shapes that a graph cannot hold.
        graphed = config.cuda_graphs and device.type == "cuda" and estimated is None
        bound = torch.zeros((), device=device)  # this step's bound on log_beta, written before each step

        def train(stage: str, steps: int, first_step: int) -> None:
            clock = time.perf_counter()
            schedule = [
                ([model.dense], config.grid_learning_rate),
                ([model.sparse_features], config.sparse_learning_rate),
                ([*model.decoder.parameters(), model.log_beta], config.network_learning_rate),
            ]
            if estimated is not None:
                schedule.append((list(estimated.parameters()), config.environment_learning_rate))
            rates = [rate for _, rate in schedule]
            # A replayed graph reads the learning rate from the device, so there it is a tensor updated in place.
            groups = [{"params": p, "lr": torch.tensor(r, device=device) if graphed else r} for p, r in schedule]
            parameters = [p for group in groups for p in group["params"]]
            # Fused Adam is one kernel for all parameters on CUDA; elsewhere the default (foreach) path.
            optimiser = torch.optim.Adam(groups, fused=device.type == "cuda" or None, capturable=graphed)

            def step() -> dict[str, torch.Tensor]:
                lighting = environment if estimated is None else estimated.environment()
                batch = rays.sample(config.rays_per_batch, config.foreground_fraction)
                terms = _losses(model, rays, batch, lighting, config, options)
                loss = _weighted(terms, config.weights)
                loss.backward()
                skipped.add_(~_guard_gradients(parameters, loss, config.max_gradient_norm))
                optimiser.step()
                if beta_bound is not None:
                    with torch.no_grad():
                        model.log_beta.clamp_(max=bound)
                # Detached, so no step's autograd graph outlives it (a live one trips graph capture's stream check).
                return {name: value.detach() for name, value in terms.items()}

            run = _GraphedStep(step, optimiser) if graphed else _EagerStep(step, optimiser)
            tail = max(1, steps // 10)
            sums: dict[str, torch.Tensor] = {}
            skipped_before = int(skipped)
            for index in range(steps):
                checkpoint(stage, index, steps)
                for group, rate in zip(optimiser.param_groups, rates, strict=True):
                    _set_value(group, "lr", _decayed(rate, index, steps, config))
                if beta_bound is not None:
                    bound.fill_(beta_bound[first_step + index])
                terms = run()
                if index >= steps - tail:
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + value
                if (index + 1) % config.check_every == 0 or index == steps - 1:
                    _check_divergence(model, stage, index + 1, int(skipped) - skipped_before, config)
            # The gradients of a replayed step live in its graph's memory pool; drop them with the stage.
            optimiser.zero_grad(set_to_none=True)
            losses = {name: float(value) / tail for name, value in sums.items()}
            stages[stage] = StageReport(steps, time.perf_counter() - clock, losses, graphed=run.graphed)
            progress(stage, 1.0)

        train("coarse", config.coarse_steps, 0)
        sparse_voxels = 0
        if config.fine_steps > 0:
            sparse_voxels = model.activate_near_surface(config.fine_band)
            if sparse_voxels:
                train("fine", config.fine_steps, config.coarse_steps)

        lighting = environment if estimated is None else Environment(estimated.log_image.detach().exp())
        psnr, coverage = training_fit(model, rays, lighting, options, config.psnr_rays)
    lighting_kind = "known" if estimated is None else "estimated"
    report = RefineReport(stages, psnr, sparse_voxels, coverage, lighting_kind, 0.0, skipped_steps=int(skipped))
    report.seconds = time.perf_counter() - begin
    return RefineResult(model, lighting, report)


def _set_value(group: dict[str, Any], key: str, value: float) -> None:
    """Set an optimiser group's hyperparameter, in place when it is a tensor (a captured graph holds that tensor)."""
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


class _EagerStep:
    """One optimisation step per call, run op by op."""

    graphed = False

    def __init__(self, step: Callable[[], dict[str, torch.Tensor]], optimiser: torch.optim.Optimizer) -> None:
        self.step, self.optimiser = step, optimiser

    def __call__(self) -> dict[str, torch.Tensor]:
        self.optimiser.zero_grad(set_to_none=True)
        return self.step()


class _GraphedStep(_EagerStep):
    """The step recorded once as a CUDA graph and replayed: a refinement step is launch-bound (about 2,100 small
    kernels; 40 ms a step on an H200 for about 15 ms of GPU work), and a replay launches them all at once.

    Capture needs a few eager calls first, on a side stream (lazy initialisation, autograd's buffers); those are
    real steps. Everything a step reads changes in place: the batch and jitter come from the device's random
    generator, the learning rates and beta's bound from tensors the caller fills before each call. If capture
    fails, the stage goes on eagerly and the log says why.
    """

    WARMUP = 3

    def __init__(self, step: Callable[[], dict[str, torch.Tensor]], optimiser: torch.optim.Optimizer) -> None:
        super().__init__(step, optimiser)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.terms: dict[str, torch.Tensor] = {}

    @property
    def graphed(self) -> bool:  # type: ignore[override]
        return self.graph is not None

    def __call__(self) -> dict[str, torch.Tensor]:
        if self.failed:
            return super().__call__()
        if self.calls < self.WARMUP:
            self.calls += 1
            side = _warmup_stream(torch.cuda.current_device())
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                terms = super().__call__()
            torch.cuda.current_stream().wait_stream(side)
            return terms
        if self.graph is None:
            self.optimiser.zero_grad(set_to_none=True)  # backward inside the graph writes fresh gradient buffers
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # the service has other threads
                    self.terms = self.step()
            except RuntimeError as error:
                log.warning("refinement runs without a CUDA graph: capturing its step failed (%s)", error)
                self.failed = True
                return super().__call__()
            self.graph = graph
        self.graph.replay()
        return self.terms


@functools.cache
def _warmup_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for all warm-ups: cuBLAS keeps workspaces for every stream it has seen (about
    0.39 GiB per refinement on an H200 when each warm-up made its own), and never frees them."""
    return torch.cuda.Stream(device)


def _beta_bound(config: RefineConfig, beta_min: float) -> list[float] | None:
    """Per image step, the bound on the field's log_beta (see RefineConfig.final_beta), or None."""
    if config.final_beta is None:
        return None
    steps = max(config.coarse_steps + config.fine_steps, 1)
    ratio = config.final_beta / config.beta_init
    return [math.log(config.beta_init * ratio ** ((i + 1) / steps) - beta_min) for i in range(steps)]


def _check_divergence(model: FeatureField, stage: str, steps: int, skipped: int, config: RefineConfig) -> None:
    """Raise DivergenceError when the parameters are not finite or too many of the stage's steps were skipped."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        raise DivergenceError(f"the field's parameters became non-finite by step {steps} of '{stage}'")
    if skipped > config.max_skipped_fraction * steps:
        raise DivergenceError(f"{skipped} of the first {steps} steps of '{stage}' had a non-finite loss or gradient")


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Fix the order of parallel scatter-adds (many samples share a voxel), so CPU runs repeat exactly.

    Only on the CPU: on CUDA the deterministic variants are slower and bit-exact repeats are not promised.
    """
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN by default (a debugging aid): a thousand
        # extra writes per step. Our results never read uninitialised memory, so leave it off.
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


@torch.no_grad()
def training_fit(
    model: FeatureField, rays: _Rays, environment: Environment, options: RenderOptions, count: int
) -> tuple[float, float]:
    """PSNR (dB) of the render against the training pixels inside the masks, on a seeded subset of `count`,
    and the share of those pixels whose ray meets the zero level set (what the mesh will cover).

    Foreground only: background pixels are matched trivially and would inflate the number.
    """
    generator = torch.Generator().manual_seed(0)
    foreground = (rays.masks > 0.5).nonzero()[:, 0].cpu()
    batch = foreground[torch.randperm(len(foreground), generator=generator)[:count]].to(rays.masks.device)
    options = RenderOptions(options.samples, options.importance_samples, options.chunk_rays, jitter=False)
    out = render_rays(model, rays.origins[batch], rays.directions[batch], environment, options)
    mse = float(((_clipped(out) - rays.colours[batch]) ** 2).mean())
    coverage = float((out.min_sdf < 0.0).float().mean()) if len(batch) else 0.0
    return -10.0 * math.log10(max(mse, 1e-12)), coverage

"""Seeded procedural objects with ground truth: the synthetic data engine.

`random_object(seed)` builds an analytic `SurfaceField` in the canonical box: 2-6 SDF primitives
under random similarities, smoothly unioned (some carve notches), each with its own procedural PBR
material, blended at the joins the same way the shapes are. `world_normalisation(seed, obj)` places
it in a world frame (Blender's: Z up, metres) that differs from the canonical one, and
`sample_cameras` puts seeded OpenCV cameras around it. `write_synthetic_bundle` renders those
views into a bundle with ground-truth buffers; `render_batch` renders training views without
touching disk; `export_ground_truth` meshes and bakes the exact field into a GLB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..bundle import TRANSFORMS, EnvironmentSpec, save_bundle
from ..cameras import Cameras, Normalisation, image_rays
from ..errors import InputError
from ..export import check_export_arguments, export_glb
from ..field import FieldSample
from ..progress import Progress, no_progress
from ..render import RenderOptions, RenderOutput, render_views
from ..shading import Environment, builtin_environment
from .materials import PartMaterial, random_material
from .sdf import CSG, Part, Placement, random_rotation

# The object is fitted so its longest side spans [-OBJECT_HALF_EXTENT, OBJECT_HALF_EXTENT].
OBJECT_HALF_EXTENT = 0.75
# VolSDF Laplace scale of the ground truth: small, so renders show a crisp surface.
GROUND_TRUTH_BETA = 0.005
# Materials are evaluated only this close to the surface (canonical units) and read as black beyond: a
# sample farther out has rendering weight below exp(-SHELL / beta) ~ 1e-9, so patterns there are wasted work.
MATERIAL_SHELL = 20 * GROUND_TRUTH_BETA
# Independent random streams per seed, so changing how cameras are drawn never changes the object.
_OBJECT_STREAM, _PLACEMENT_STREAM, _CAMERA_STREAM, _LIGHTING_STREAM = 0, 1, 2, 3


def _stream(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


class SyntheticObject:
    """An analytic surface field: CSG geometry plus one material per added part."""

    def __init__(self, csg: CSG, materials: list[PartMaterial | None], bounds: Tensor) -> None:
        self.csg, self.materials = csg, materials
        self.bounds = bounds  # [2, 3] canonical min / max corner of the surface (sampled, slightly padded)
        self._beta = torch.tensor(GROUND_TRUTH_BETA)

    @property
    def beta(self) -> Tensor:
        return self._beta

    def sdf(self, points: Tensor) -> Tensor:
        return self.csg.distance(points)

    def __call__(self, points: Tensor) -> FieldSample:
        distance, weights, local_points = self.csg.evaluate(points)
        weights = weights * (distance.detach().abs() < MATERIAL_SHELL)
        albedo = points.new_zeros(points.shape[0], 3)
        roughness, metallic = points.new_zeros(points.shape[0]), points.new_zeros(points.shape[0])
        for material, weight, local in zip(self.materials, weights, local_points, strict=True):
            # Most points belong to one part: evaluate each material only where it contributes.
            where = (weight > 0.0).nonzero(as_tuple=True)[0]
            if material is None or where.numel() == 0:
                continue
            w = weight[where]
            part_albedo, part_roughness, part_metallic = material(local[where])
            albedo = albedo.index_add(0, where, w[:, None] * part_albedo)
            roughness = roughness.index_add(0, where, w * part_roughness)
            metallic = metallic.index_add(0, where, w * part_metallic)
        return FieldSample(sdf=distance, albedo=albedo, roughness=roughness, metallic=metallic)

    def to(self, device: torch.device | str) -> SyntheticObject:
        materials = [None if m is None else m.to(device) for m in self.materials]
        moved = SyntheticObject(self.csg.to(device), materials, self.bounds.to(device))
        moved._beta = self._beta.to(device)
        return moved

    @property
    def device(self) -> torch.device:
        return self.bounds.device


def _random_primitive(rng: np.random.Generator) -> tuple[str, tuple[float, ...], Tensor, Tensor]:
    """A primitive of about unit size: its kind, parameters, half extents [3] and a point well inside it [3]."""
    kind = str(rng.choice(["sphere", "rounded_box", "capsule", "cylinder", "torus", "capped_cone"]))
    u = rng.uniform
    if kind == "sphere":
        params, extent = (1.0,), (1.0, 1.0, 1.0)
    elif kind == "rounded_box":
        half = u(0.45, 1.0, size=3)
        params, extent = (*half, float(half.min() * u(0.05, 0.4))), tuple(half)
    elif kind == "capsule":
        half_length, radius = u(0.3, 0.8), u(0.3, 0.55)
        params, extent = (half_length, radius), (radius, radius, half_length + radius)
    elif kind == "cylinder":
        radius, half_height = u(0.45, 0.95), u(0.3, 1.0)
        params, extent = (radius, half_height, min(radius, half_height) * u(0.05, 0.3)), (radius, radius, half_height)
    elif kind == "torus":
        major = u(0.6, 0.85)
        minor = major * u(0.25, 0.45)
        params, extent = (major, minor), (major + minor, major + minor, minor)
    else:
        half_height, bottom = u(0.45, 0.9), u(0.55, 0.95)
        top = bottom * u(0.1, 0.7)
        params, extent = (half_height, bottom, top, top * u(0.1, 0.5)), (bottom, bottom, half_height)
    # The torus is the one primitive whose centre is not inside it: its core is on the tube's axis.
    core = torch.tensor([params[0], 0.0, 0.0] if kind == "torus" else [0.0, 0.0, 0.0])
    return kind, tuple(float(p) for p in params), torch.tensor(extent, dtype=torch.float32), core


def _surface_bounds(csg: CSG, lower: Tensor, upper: Tensor, resolution: int = 48) -> Tensor:
    """Bounds [2, 3] of the solid (sdf < 0) sampled on a grid over [lower, upper], padded by one cell."""
    axes = [torch.linspace(float(lo), float(hi), resolution) for lo, hi in zip(lower, upper, strict=True)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    inside = grid[csg.distance(grid) < 0.0]
    if inside.numel() == 0:
        raise RuntimeError("the synthetic object came out empty")  # a generator bug, not bad input
    cell = (upper - lower) / (resolution - 1)
    return torch.stack([inside.min(dim=0).values - cell, inside.max(dim=0).values + cell])


def _random_surface_point(csg: CSG, rng: np.random.Generator, lower: Tensor, upper: Tensor) -> Tensor:
    """A seeded point on the surface of `csg`: random points in [lower, upper] pulled onto the zero set."""
    points = lower + (upper - lower) * torch.tensor(rng.random((256, 3)), dtype=torch.float32)
    for _ in range(6):  # Newton steps along the gradient; exact distances converge in one or two
        points = points.detach().requires_grad_(True)
        distance = csg.distance(points)
        (gradient,) = torch.autograd.grad(distance.sum(), points)
        points = points - distance[:, None] * gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    points = points.detach()
    on_surface = points[csg.distance(points).abs() < 1e-3]
    return on_surface[int(rng.integers(len(on_surface)))]


def random_object(seed: int, device: torch.device | str = "cpu") -> SyntheticObject:
    """A seeded procedural object inside [-0.75, 0.75]^3 of the canonical box; same seed, same object."""
    rng = _stream(seed, _OBJECT_STREAM)
    parts: list[Part] = []
    materials: list[PartMaterial | None] = []
    reach: list[float] = []  # per part, a radius around its centre that holds all of it
    for index in range(int(rng.integers(2, 7))):
        carve = index >= 2 and rng.random() < 0.2
        kind, params, extent, core = _random_primitive(rng)
        size = float(
            rng.uniform(0.15, 0.3) if carve else rng.uniform(0.3, 0.5) if index == 0 else rng.uniform(0.2, 0.45)
        )
        rotation = torch.tensor(random_rotation(rng), dtype=torch.float32)
        if index == 0:
            translation = torch.zeros(3)
        else:
            # Put a point inside the new part on the surface so far: it grows from (or bites into) the
            # object, which therefore stays in one piece.
            centres = torch.stack([part.placement.translation for part in parts])
            radius = torch.tensor(reach)[:, None]
            anchor = _random_surface_point(
                CSG(parts, blend=0.0), rng, (centres - radius).min(0).values, (centres + radius).max(0).values
            )
            translation = anchor - size * rotation @ core
        parts.append(Part(kind, params, Placement(rotation, translation, size), carve))
        materials.append(None if carve else random_material(rng, extent))
        reach.append(size * float(extent.norm() + core.norm()))
    csg = CSG(parts, blend=float(rng.uniform(0.03, 0.1)))

    # Fit the design into the canonical box: centre its sampled bounds and scale the longest side.
    centres = torch.stack([part.placement.translation for part in parts])
    radius = torch.tensor(reach)[:, None]
    bounds = _surface_bounds(csg, (centres - radius).min(0).values, (centres + radius).max(0).values)
    scale = OBJECT_HALF_EXTENT / float((bounds[1] - bounds[0]).max() / 2.0)
    offset = -scale * (bounds[0] + bounds[1]) / 2.0
    return SyntheticObject(csg.then(scale, offset), materials, bounds * scale + offset).to(device)


def world_normalisation(seed: int, obj: SyntheticObject) -> Normalisation:
    """A seeded world placement: an object 0.3-1 m across, resting on the ground (z = 0) near the origin."""
    rng = _stream(seed, _PLACEMENT_STREAM)
    size_m = float(rng.uniform(0.3, 1.0))
    scale = 2.0 * OBJECT_HALF_EXTENT / size_m  # canonical units per metre
    lowest = float(obj.bounds[0, 2])
    centre = torch.tensor([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), -lowest / scale], dtype=torch.float32)
    return Normalisation(centre=centre, scale=scale)


# Horizontal field of view of every synthetic camera; one focal length keeps views comparable.
CAMERA_FOV_DEGREES = 40.0
# Camera elevations: mostly from above, a little from below, never straight down (look-at breaks).
ELEVATION_RANGE_DEGREES = (-15.0, 65.0)


def look_at(eye: Tensor, target: Tensor) -> Tensor:
    """OpenCV camera-to-world matrices [V, 4, 4] at eyes [V, 3] looking at target [3], world Z up."""
    forward = target - eye
    forward = forward / forward.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0]).to(eye).expand_as(forward)
    right = torch.linalg.cross(forward, up, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right, dim=-1)  # OpenCV's +Y points down the image
    c2w = torch.eye(4).to(eye).repeat(len(eye), 1, 1)
    c2w[:, :3, :3] = torch.stack([right, down, forward], dim=-1)
    c2w[:, :3, 3] = eye
    return c2w


def sample_cameras(
    seed: int, views: int, resolution: int, obj: SyntheticObject, normalisation: Normalisation
) -> Cameras:
    """Seeded square cameras in the world frame around the object, each seeing all of it.

    Azimuths are stratified (one per equal sector, jittered) so few views still surround the object;
    elevations are uniform on the sphere's band between ELEVATION_RANGE_DEGREES.
    """
    rng = _stream(seed, _CAMERA_STREAM)
    bounds = normalisation.to_world(obj.bounds.cpu())
    target = bounds.mean(dim=0)
    radius = float((bounds[1] - bounds[0]).norm() / 2.0)
    half_fov = math.radians(CAMERA_FOV_DEGREES) / 2.0
    distance = 1.05 * radius / math.sin(half_fov)  # the bounding sphere just fits the narrowest view

    azimuth = 2.0 * np.pi * (rng.random() + (np.arange(views) + rng.random(views)) / views)
    low, high = (math.sin(math.radians(a)) for a in ELEVATION_RANGE_DEGREES)
    elevation = np.arcsin(rng.uniform(low, high, size=views))
    directions = np.stack(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)], axis=-1
    )
    eyes = target + distance * torch.tensor(directions, dtype=torch.float32)
    focal = 0.5 * resolution / math.tan(half_fov)
    intrinsics = torch.tensor([focal, focal, resolution / 2.0, resolution / 2.0]).repeat(views, 1)
    return Cameras(look_at(eyes, target), intrinsics, resolution, resolution)


# Margin that `Normalisation.from_aabb` leaves by default: the bundle's aabb is the canonical cube of this
# half extent, so a reconstruction that normalises by the aabb lands exactly in our canonical frame.
AABB_MARGIN = 0.1
VIEWS_RANGE = (1, 512)
RESOLUTION_RANGE = (16, 2048)
DEFAULT_ENVIRONMENT = "studio"


@dataclass
class SyntheticScene:
    """One seeded object with its world placement and cameras (world frame, OpenCV)."""

    seed: int
    object: SyntheticObject
    normalisation: Normalisation
    cameras: Cameras

    @property
    def canonical_cameras(self) -> Cameras:
        """The cameras in the canonical frame, where the object's field lives."""
        return self.normalisation.cameras_to_canonical(self.cameras)

    @property
    def aabb(self) -> Tensor:
        """[2, 3] world box that `Normalisation.from_aabb` maps back onto this scene's canonical frame."""
        corner = torch.full((3,), 1.0 - AABB_MARGIN)
        return torch.stack([self.normalisation.to_world(-corner), self.normalisation.to_world(corner)])


def sample_scene(seed: int, views: int, resolution: int, device: torch.device | str = "cpu") -> SyntheticScene:
    """The object, world placement and `views` square cameras of `resolution` pixels for one seed."""
    obj = random_object(seed)
    normalisation = world_normalisation(seed, obj)
    cameras = sample_cameras(seed, views, resolution, obj, normalisation)
    return SyntheticScene(seed, obj.to(device), normalisation, cameras.to(device))


def environment_rotation(seed: int) -> float:
    """A seeded rotation of the environment about world Z (radians), so lighting varies between seeds."""
    return float(_stream(seed, _LIGHTING_STREAM).uniform(0.0, 2.0 * math.pi))


def render_batch(
    scenes: Sequence[SyntheticScene],
    environment: Environment,
    options: RenderOptions = RenderOptions(),  # noqa: B008 (never mutated)
    progress: Progress = no_progress,
) -> RenderOutput:
    """Render every scene's views under one environment, without touching disk; buffers are [B, V, H, W, C].

    All scenes need the same number of views and resolution. Buffers follow `render_views`: canonical
    frame, colours and materials premultiplied by alpha; `ground_truth_buffers` turns one scene's
    slice into straight values in world units.
    """
    outputs = []
    for index, scene in enumerate(scenes):
        cameras = scene.canonical_cameras.to(environment.device)
        fraction = index / len(scenes)

        def report(stage: str, done: float, fraction: float = fraction) -> None:
            progress(stage, fraction + done / len(scenes))

        outputs.append(render_views(scene.object.to(environment.device), cameras, environment, options, report))
    return RenderOutput(**{key: torch.stack([vars(o)[key] for o in outputs]) for key in vars(outputs[0])})


def ground_truth_buffers(output: RenderOutput, scene: SyntheticScene) -> dict[str, Tensor]:
    """One scene's render [V, H, W, C] as bundle buffers: straight rgb, mask and the GT material maps.

    Values are unpremultiplied (the surface's own value at partially covered pixels) and zero where
    nothing was hit; depth is camera z-depth in world units, normals are world-space unit vectors
    (the canonical frame has the world's axes).
    """
    alpha = output.alpha
    hit = alpha > 1e-3
    straight = {
        key: torch.where(hit, getattr(output, key) / alpha.clamp_min(1e-3), 0.0)
        for key in ("rgb", "albedo", "roughness", "metallic")
    }
    _, directions = image_rays(scene.cameras.to(alpha.device))
    forward = scene.cameras.c2w[:, None, None, :3, 2].to(alpha.device)
    z_depth = output.depth * (directions * forward).sum(-1, keepdim=True) / scene.normalisation.scale
    return {
        "rgb": straight["rgb"],
        "mask": alpha[..., 0].clamp(0.0, 1.0),
        "albedo": straight["albedo"].clamp(0.0, 1.0),
        "roughness": straight["roughness"][..., 0].clamp(0.0, 1.0),
        "metallic": straight["metallic"][..., 0].clamp(0.0, 1.0),
        "normal": torch.where(hit, output.normal, 0.0),
        "depth": torch.where(hit, z_depth, 0.0)[..., 0],
    }


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise InputError(f"--seed {seed} is out of range; give a whole number from 0 to 2^63 - 1")


def _check_synth_arguments(seed: int, views: int, resolution: int, environment: Path | None, out: Path) -> None:
    """Reject unusable `synth` arguments with one sentence each, before any work or any file is written."""
    _check_seed(seed)
    low, high = VIEWS_RANGE
    if not low <= views <= high:
        raise InputError(f"--views {views} is outside {low}..{high}; ask for between {low} and {high} views")
    low, high = RESOLUTION_RANGE
    if not low <= resolution <= high:
        raise InputError(f"--res {resolution} is outside {low}..{high} pixels; pick an image size such as 256")
    if environment is not None:
        if not environment.is_file():
            raise InputError(f"environment map '{environment}' does not exist; give the path of an .exr or .hdr file")
        if environment.suffix.lower() not in (".exr", ".hdr"):
            raise InputError(f"environment map '{environment}' is not .exr or .hdr; convert it to one of those")
    if out.is_file():
        raise InputError(f"output '{out}' is a file; give a folder path for the bundle")
    # Writing replaces the folder, so only ever replace an earlier bundle, never an unrelated folder.
    if out.is_dir() and any(out.iterdir()) and not (out / TRANSFORMS).is_file():
        raise InputError(f"output folder '{out}' exists and is not a bundle; give a new or empty folder")


def write_synthetic_bundle(
    seed: int,
    views: int,
    resolution: int,
    environment: Path | None,
    out: Path,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
) -> Path:
    """Render a seeded object into a bundle folder with ground-truth buffers; returns the folder.

    The lighting is `environment` (default: the built-in studio world), rotated by a seeded angle and
    referenced from transforms.json so the known-lighting mode can use it.
    """
    environment, out = (None if environment is None else Path(environment)), Path(out)
    _check_synth_arguments(seed, views, resolution, environment, out)
    environment_path = builtin_environment(DEFAULT_ENVIRONMENT) if environment is None else environment
    lighting = EnvironmentSpec(path=environment_path, rotation_z=environment_rotation(seed), strength=1.0)
    loaded = Environment.load(lighting.path, lighting.rotation_z, lighting.strength, device)

    scene = sample_scene(seed, views, resolution, device)
    with torch.no_grad():
        output = render_views(scene.object, scene.canonical_cameras, loaded, RenderOptions(), progress)
    buffers = {key: value.cpu() for key, value in ground_truth_buffers(output, scene).items()}
    rgb, mask = buffers.pop("rgb"), buffers.pop("mask")
    save_bundle(out, scene.cameras.to("cpu"), rgb, mask, aabb=scene.aabb, environment=lighting, ground_truth=buffers)
    return out


def export_ground_truth(
    seed: int,
    out: Path,
    resolution: int = 256,
    texture_size: int = 1024,
    target_faces: int = 100_000,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
) -> Path:
    """Mesh and bake a seeded object's exact field into a PBR GLB placed in its world frame."""
    _check_seed(seed)
    check_export_arguments(Path(out), resolution, texture_size, target_faces)
    obj = random_object(seed, device)
    return export_glb(
        obj,
        out,
        world_normalisation(seed, obj),
        resolution=resolution,
        texture_size=texture_size,
        target_faces=target_faces,
        name=f"synthetic_{seed}",
        progress=progress,
    )

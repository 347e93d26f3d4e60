"""Synthetic objects: SDF primitives and CSG, procedural materials, seeded objects, cameras, batches."""

import math

import numpy as np
import pytest
import torch

from backend.cameras import Normalisation, project
from backend.data import sdf as sdf_module
from backend.data.materials import PartMaterial, fbm, noise_volume, text_texture
from backend.data.synthetic import (
    OBJECT_HALF_EXTENT,
    random_object,
    render_batch,
    sample_scene,
)
from backend.shading import Environment

PRIMITIVE_CASES = {
    "sphere": (0.7,),
    "rounded_box": (0.8, 0.5, 0.3, 0.1),
    "capsule": (0.5, 0.3),
    "cylinder": (0.6, 0.4, 0.1),
    "torus": (0.6, 0.2),
    "capped_cone": (0.5, 0.7, 0.2, 0.05),
}


def project_to_surface(distance, points: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Pull points onto the zero set of an SDF by Newton steps along its gradient."""
    for _ in range(steps):
        points = points.detach().requires_grad_(True)
        d = distance(points)
        (gradient,) = torch.autograd.grad(d.sum(), points)
        points = points - d[:, None] * gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return points.detach()


def gradient_norm(distance, points: torch.Tensor) -> torch.Tensor:
    points = points.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(distance(points).sum(), points)
    return gradient.norm(dim=-1)


@pytest.mark.parametrize("kind", list(PRIMITIVE_CASES))
def test_primitive_is_an_exact_distance(kind):
    """sdf(q) equals the distance from q to the nearest surface point, found by brute force."""
    params = PRIMITIVE_CASES[kind]

    def distance(p):
        return sdf_module.PRIMITIVES[kind](p, *params)

    generator = torch.Generator().manual_seed(0)
    surface = project_to_surface(distance, torch.rand(40_000, 3, generator=generator) * 2.4 - 1.2)
    surface = surface[distance(surface).abs() < 1e-5]
    queries = torch.rand(300, 3, generator=generator) * 3.0 - 1.5
    brute_force = torch.cdist(queries, surface).min(dim=1).values
    assert torch.allclose(distance(queries).abs(), brute_force, atol=0.02)
    assert float(distance(torch.tensor([[3.0, 3.0, 3.0]]))) > 0.0
    inside = torch.tensor([[params[0], 0.0, 0.0]]) if kind == "torus" else torch.zeros(1, 3)
    assert float(distance(inside)) < 0.0
    assert torch.allclose(gradient_norm(distance, queries), torch.ones(len(queries)), atol=1e-4)


def test_smooth_operations_stay_within_the_blend_band():
    a, b = torch.linspace(-1, 1, 101)[:, None].expand(101, 101), torch.linspace(-1, 1, 101)[None].expand(101, 101)
    blend = 0.2
    union = sdf_module.smooth_union(a, b, blend)
    assert (union <= torch.minimum(a, b) + 1e-6).all()
    assert (union >= torch.minimum(a, b) - blend / 4 - 1e-6).all()
    far_apart = (a - b).abs() >= blend
    assert torch.equal(union[far_apart], torch.minimum(a, b)[far_apart])
    intersection = sdf_module.smooth_intersection(a, b, blend)
    assert torch.equal(intersection[far_apart], torch.maximum(a, b)[far_apart])
    carved = sdf_module.smooth_subtraction(a, b, blend)
    assert torch.allclose(carved, sdf_module.smooth_intersection(a, -b, blend))


def test_random_rotation_is_a_rotation():
    rotation = sdf_module.random_rotation(np.random.default_rng(1))
    assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert math.isclose(np.linalg.det(rotation), 1.0, abs_tol=1e-12)


def test_same_seed_same_object_and_different_seeds_differ():
    points = torch.rand(4096, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    first, again, other = random_object(11)(points), random_object(11)(points), random_object(12)(points)
    for key in ("sdf", "albedo", "roughness", "metallic"):
        assert torch.equal(getattr(first, key), getattr(again, key)), key
    assert not torch.allclose(first.sdf, other.sdf)


@pytest.mark.parametrize("seed", range(6))
def test_object_is_a_distance_field_inside_the_box(seed):
    obj = random_object(seed)
    assert 2 <= len(obj.csg.parts) <= 6
    axis = torch.linspace(-1.0, 1.0, 48)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    distance = obj.sdf(grid)
    inside = grid[distance < 0.0]
    assert len(inside) > 0.01 * len(grid), "the object should fill a visible part of the box"
    assert inside.abs().max() <= 0.8, "the solid must stay inside [-0.8, 0.8]^3"
    assert float(obj.bounds.abs().max()) <= OBJECT_HALF_EXTENT + 0.05
    assert (distance[(grid.abs() > 0.95).any(dim=-1)] > 0.0).all(), "the box boundary is outside the object"

    # Eikonal on the surface: exact away from the joins, and smooth joins only ever shrink |grad|. Where a
    # carving part grazes the surface, the smooth max of opposing gradients dips lower in a thin sliver.
    near = project_to_surface(obj.sdf, grid[distance.abs() < 0.1], steps=3)
    near = near[obj.sdf(near).abs() < 1e-3]  # drop the few stuck in a shallow positive minimum near a carve
    norms = gradient_norm(obj.sdf, near)
    assert abs(float(norms.median()) - 1.0) < 0.01
    assert float(((norms - 1.0).abs() < 0.1).float().mean()) > 0.75
    assert float(norms.quantile(0.01)) > 0.5 and float(norms.max()) < 1.01


def test_materials_are_in_range_and_varied():
    metallic_parts, patterns = 0, set()
    for seed in range(8):
        obj = random_object(seed)
        points = torch.rand(20_000, 3, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8
        surface = project_to_surface(obj.sdf, points, steps=3)
        sample = obj(surface[obj.sdf(surface).abs() < 1e-3])
        assert 0.0 <= float(sample.albedo.min()) and float(sample.albedo.max()) <= 1.0
        assert 0.0 < float(sample.roughness.min()) and float(sample.roughness.max()) <= 1.0
        assert 0.0 <= float(sample.metallic.min()) and float(sample.metallic.max()) <= 1.0
        assert float(sample.albedo.std(dim=0).max()) > 0.02, "an object should not be one flat colour"
        materials = [m for m in obj.materials if m is not None]
        metallic_parts += sum(m.metallic[0] == 1.0 for m in materials)
        patterns |= {m.pattern for m in materials}
    assert metallic_parts >= 1
    assert len(patterns) >= 4


def test_noise_tiles_seamlessly_and_is_seeded():
    volume = noise_volume(5)
    points = torch.rand(1000, 3) * 10
    period = volume.shape[0] - 1
    assert torch.allclose(fbm(points, volume, octaves=1), fbm(points + period, volume, octaves=1), atol=1e-5)
    assert torch.equal(noise_volume(5), volume) and not torch.equal(noise_volume(6), volume)
    values = fbm(points, volume)
    assert 0.0 <= float(values.min()) and float(values.max()) <= 1.0 and float(values.std()) > 0.05


def test_printed_text_shows_up_in_the_albedo():
    """A label drawn with Pillow's font is projected onto the part's face with the glyphs' contrast."""
    mask = text_texture(["LSRM-042"], font_size=28)
    coverage = float(mask.mean())
    assert 0.05 < coverage < 0.5
    white, black = torch.ones(3), torch.zeros(3)
    material = PartMaterial(
        pattern="text",
        base_colour=white,
        accent_colour=black,
        roughness=(0.5, 0.5),
        metallic=(0.0, 0.0),
        frequency=1.0,
        stripe_direction=torch.tensor([1.0, 0.0, 0.0]),
        extent=torch.ones(3),
        noise=noise_volume(0),
        print_mask=mask,
        print_tiles=torch.tensor([1.0, mask.shape[1] / mask.shape[0]]),
        wear=0.0,
    )
    # One texture tile in the middle of the +Z face of a cube of half extent 1: the ink matches the texture.
    u, v = torch.meshgrid(torch.linspace(-0.5, 0.499, 400), torch.linspace(-0.5, 0.499, 400), indexing="xy")
    face = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(u.numel())], dim=-1)
    albedo, _, _ = material(face)
    ink = 1.0 - albedo[:, 0]
    assert abs(float(ink.mean()) - coverage) < 0.03
    assert float(albedo.var()) > 0.02


def test_scene_cameras_see_the_object_and_the_aabb_normalises_back():
    scene = sample_scene(seed=4, views=6, resolution=64)
    recovered = Normalisation.from_aabb(scene.aabb)
    assert torch.allclose(recovered.centre, scene.normalisation.centre, atol=1e-5)
    assert math.isclose(recovered.scale, scene.normalisation.scale, rel_tol=1e-5)
    assert (scene.cameras.centres[:, 2] > scene.normalisation.centre[2] - 1.0).all()
    corners = torch.cartesian_prod(*scene.object.bounds.T)  # the 8 corners of the object's bounds
    uv, depth = project(scene.cameras, scene.normalisation.to_world(corners))
    assert (depth > 0).all()
    assert ((uv >= 0) & (uv <= 64)).all(), "every view sees the whole object"
    size_m = float((scene.object.bounds[1] - scene.object.bounds[0]).max()) / scene.normalisation.scale
    assert 0.3 <= size_m <= 1.0


def test_render_batch_renders_every_scene_without_files():
    scenes = [sample_scene(seed, views=2, resolution=16) for seed in (1, 2)]
    output = render_batch(scenes, Environment.uniform((0.8, 0.8, 0.8)))
    assert output.rgb.shape == (2, 2, 16, 16, 3) and output.alpha.shape == (2, 2, 16, 16, 1)
    coverage = output.alpha.mean(dim=(2, 3, 4))
    assert ((coverage > 0.02) & (coverage < 0.9)).all()
    assert torch.isfinite(output.rgb).all()

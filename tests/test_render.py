"""VolSDF rendering: density, sampling, buffers of an analytic sphere, chunking, gradients."""

import math

import torch

from backend.cameras import Cameras
from backend.field import FeatureField, FieldConfig
from backend.render import (
    RenderOptions,
    laplace_density,
    ray_box_intersection,
    render_rays,
    render_views,
)
from backend.shading import Environment
from tests.fields import UniformSphere

RADIUS = 0.5


def sphere(beta: float = 0.005) -> UniformSphere:
    """A grey sphere with a red radiance head."""
    return UniformSphere(RADIUS, (0.5, 0.5, 0.5), 0.6, 0.0, radiance=(1.0, 0.0, 0.0), beta=beta)


def camera_on_z(distance: float = 3.0, size: int = 24, focal: float = 40.0) -> Cameras:
    """One camera on +Z looking down at the origin (OpenCV: +Z forward, Y down)."""
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    c2w[2, 3] = distance
    return Cameras(c2w[None], torch.tensor([[focal, focal, size / 2, size / 2]]), size, size)


def sphere_hits(origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Exact distance to the sphere along each ray, NaN for misses."""
    b = (origins * directions).sum(-1)
    disc = b * b - (origins * origins).sum(-1) + RADIUS**2
    return torch.where(disc > 0, -b - disc.clamp_min(0).sqrt(), torch.full_like(b, math.nan))


def test_laplace_density_and_box_intersection():
    beta = torch.tensor(0.1)
    sdf = torch.tensor([-10.0, -0.1, 0.0, 0.1, 10.0])
    density = laplace_density(sdf, beta)
    assert torch.allclose(density[2], torch.tensor(0.5 / 0.1))
    assert torch.allclose(density[0], torch.tensor(1 / 0.1), rtol=1e-4) and density[-1] < 1e-30
    assert (density.diff() <= 0).all()  # denser inside
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [0.0, 3.0, 3.0]])
    directions = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    near, far = ray_box_intersection(origins, directions)
    assert torch.allclose(near[:2], torch.tensor([2.0, 0.0])) and torch.allclose(far[:2], torch.tensor([4.0, 1.0]))
    assert far[2] <= near[2]  # misses the box


def test_sphere_buffers_alpha_depth_normals():
    cameras = camera_on_z()
    with torch.no_grad():  # normals come from autograd even under no_grad
        out = render_views(sphere(), cameras, Environment.uniform(), RenderOptions(samples=32, importance_samples=32))
    assert out.rgb.shape == (1, 24, 24, 3) and out.alpha.shape == (1, 24, 24, 1) and not out.rgb.requires_grad

    from backend.cameras import image_rays

    origins, directions = image_rays(cameras)
    expected = sphere_hits(origins, directions)
    hit = expected.isfinite() & (expected < 2.7)  # away from the silhouette
    closest = ((origins * origins).sum(-1) - (origins * directions).sum(-1) ** 2).sqrt()
    miss = closest > RADIUS + 0.05  # clear of the soft VolSDF edge
    alpha, depth = out.alpha[..., 0], out.depth[..., 0]
    assert (alpha[hit] > 0.999).all() and (alpha[miss] < 1e-3).all()
    assert (depth[hit] - expected[hit]).abs().max() < 0.01  # the surface sits at the zero level set
    normals = out.normal[hit]
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(normals)), atol=1e-4)
    points = origins[hit] + directions[hit] * expected[hit][:, None]
    assert (normals * points / RADIUS).sum(-1).min() > 0.999  # the sphere's outward normals
    # Materials are premultiplied by alpha; the eikonal term of an exact SDF is zero.
    assert torch.allclose(out.albedo[hit], torch.full_like(out.albedo[hit], 0.5), atol=1e-3)
    assert out.eikonal.max() < 1e-6
    # Over a white background, a miss shows the background; a hit is the shaded grey surface.
    composite = out.composite(1.0)
    assert torch.allclose(composite[miss], torch.ones_like(composite[miss]), atol=1e-3)
    assert ((composite[hit] > 0.3) & (composite[hit] < 0.7)).all()  # grey under a white furnace


def test_radiance_mode_and_chunking_agree():
    cameras = camera_on_z(size=12)
    options = RenderOptions(samples=24, importance_samples=16, chunk_rays=1000)
    with torch.no_grad():
        whole = render_views(sphere(), cameras, None, options)
        pieces = render_views(sphere(), cameras, None, RenderOptions(samples=24, importance_samples=16, chunk_rays=7))
    assert torch.allclose(whole.rgb, pieces.rgb, atol=1e-6)
    red = whole.rgb[whole.alpha[..., 0] > 0.999]
    assert torch.allclose(red, torch.tensor([1.0, 0.0, 0.0]).expand_as(red), atol=1e-3)


def test_importance_sampling_finds_a_sharp_surface():
    # With a tiny beta and few uniform samples, the surface still lands at the right depth.
    origins = torch.tensor([[0.0, 0.0, 3.0]]).repeat(5, 1)
    directions = torch.nn.functional.normalize(torch.tensor([[0.0, 0.03 * i, -1.0] for i in range(5)]), dim=-1)
    out = render_rays(sphere(beta=1e-4), origins, directions, None, RenderOptions(samples=8, importance_samples=32))
    assert (out.alpha > 0.999).all()
    # Uniform samples alone are 0.25 apart here; the resampled ones pin the surface ten times closer.
    assert (out.depth[:, 0] - sphere_hits(origins, directions)).abs().max() < 0.02


def test_rendering_is_differentiable_for_a_learned_field():
    field = FeatureField(FieldConfig(channels=4, dense_resolution=8, sparse_resolution=16, hidden=8, radiance=True))
    with torch.no_grad():
        field.decoder.geometry.bias[0] = -0.05  # some opacity so every head matters
    origins = torch.tensor([[0.0, 0.0, 3.0]]).repeat(16, 1)
    directions = torch.nn.functional.normalize(torch.randn(16, 3) * 0.2 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    options = RenderOptions(samples=16, importance_samples=8, jitter=True)
    out = render_rays(field, origins, directions, Environment.uniform((0.5, 0.6, 0.7)), options)
    (out.rgb.mean() + out.eikonal.mean() + out.depth.mean()).backward()
    for name in ("dense", "log_beta", "decoder.geometry.weight", "decoder.material.weight"):
        grad = dict(field.named_parameters())[name].grad
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0, name
    radiance = render_rays(field, origins, directions, None, options).rgb.mean()
    radiance.backward()
    assert field.decoder.radiance.weight.grad.abs().sum() > 0


def test_min_sdf_is_the_zero_level_silhouette_that_the_soft_density_widens():
    # A ray's smallest SDF sample is its closest approach to the surface (the sphere's: distance to the
    # centre minus the radius). Opacity reaches 0.5 on rays that miss the zero level set by a few beta: that
    # is why refinement also fits the zero level set's own silhouette to the masks (the mesh is that set).
    beta = 0.02
    cameras = camera_on_z(size=32)
    with torch.no_grad():
        out = render_views(sphere(beta), cameras, None, RenderOptions(samples=64, importance_samples=64))
    from backend.cameras import image_rays

    origins, directions = image_rays(cameras)
    closest = ((origins * origins).sum(-1) - (origins * directions).sum(-1) ** 2).sqrt()
    min_sdf, alpha = out.min_sdf[..., 0], out.alpha[..., 0]
    near = (closest - RADIUS).abs() < 5 * beta  # where samples crowd around the surface
    assert (min_sdf - (closest - RADIUS))[near].abs().max() < 0.01
    widened = (alpha > 0.5) & (min_sdf > beta)
    assert widened.any() and not ((alpha < 0.5) & (min_sdf < -beta)).any()

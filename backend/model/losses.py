"""What the transformer is trained on: its field, rendered through target views, against those views.

One function, used by the overfit test and by training: render a random subset of rays of the target
views with the one renderer (`render.render_rays`) and compare with linear colours and masks, plus the
ground-truth buffers that exist (materials, depth, normals) and a known SDF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cameras import Cameras, picked_pixel_rays
from ..colour import linear_to_srgb
from ..field import SurfaceField
from ..render import RenderOptions, render_rays
from ..shading import Environment

SURFACE_BAND = 0.01  # canonical units: a projected point this close to the true surface carries its material


@dataclass(frozen=True)
class LossConfig:
    rays: int = 1024  # rays per object and step
    colour: float = 1.0  # MSE on sRGB-encoded RGB (the display space PSNR-L judges; linear MSE ignores dark colours)
    mask: float = 0.5  # MSE between rendered opacity and the mask
    eikonal: float = 0.05  # |grad sdf| = 1 at the samples
    material: float = 0.0  # MSE on rendered albedo (sRGB-encoded) / roughness / metallic where ground truth exists
    # MSE on albedo (sRGB-encoded) / roughness / metallic read at points on a known true surface: a dense signal
    # that does not wait for the predicted geometry (docs/TRAINING.md, "Why colour did not learn").
    surface_material: float = 0.0
    depth: float = 0.0  # L1 on the ray distance to the surface (canonical units) inside the mask
    normal: float = 0.0  # 1 - cos between finite-difference SDF normals and the true ones (LIRM's numerical normal)
    normal_step: float = 0.01  # finite-difference step of the numerical normals (canonical units)
    sdf: float = 0.0  # L1 to a known signed distance (synthetic objects), at random points in the box
    sdf_points: int = 2048
    render: RenderOptions = field(
        default_factory=lambda: RenderOptions(samples=32, importance_samples=16, chunk_rays=4096, jitter=True)
    )


def view_loss(
    surface: SurfaceField,
    cameras: Cameras,
    images: torch.Tensor,
    masks: torch.Tensor,
    environment: Environment | None,
    config: LossConfig,
    generator: torch.Generator | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
    truth: SurfaceField | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms (unweighted, plus "total") for one object: cameras canonical, images [V, H, W, 3] linear
    premultiplied-free colours, masks [V, H, W]; `buffers` optional ground-truth maps "albedo" [V, H, W, 3],
    "roughness" and "metallic" [V, H, W] (straight values), "depth" [V, H, W] (ray distance, canonical) and
    "normal" [V, H, W, 3]; `truth` an optional ground-truth field (canonical frame) for the SDF term, whose
    points are half uniform in the box and half within 0.1 of its surface."""
    total = masks.numel()
    pick = torch.randint(0, total, (config.rays,), generator=generator, device="cpu").to(images.device)
    rays = picked_pixel_rays(cameras, pick)  # only the rays rendered, not every pixel's
    out = render_rays(surface, *rays, environment, config.render)
    alpha = masks.reshape(-1)[pick, None]
    target = images.reshape(-1, 3)[pick] * alpha  # premultiplied, as the renderer's rgb
    terms = {
        "colour": F.mse_loss(linear_to_srgb(out.rgb), linear_to_srgb(target)),
        "mask": F.mse_loss(out.alpha, alpha),
        "eikonal": out.eikonal.mean(),
    }
    weights = {"colour": config.colour, "mask": config.mask, "eikonal": config.eikonal}
    buffers = buffers or {}
    if config.material > 0:
        for name in ("albedo", "roughness", "metallic"):
            if name in buffers:
                true = buffers[name].reshape(total, -1)[pick] * alpha
                terms[name] = _material_error(name, getattr(out, name), true)
                weights[name] = config.material
    solid = (alpha > 0.5).to(alpha)  # geometry terms only where the true surface covers the pixel
    if "depth" in buffers and config.depth > 0:
        error = (out.depth - buffers["depth"].reshape(total, 1)[pick]).abs()
        terms["depth"] = (error * solid).sum() / solid.sum().clamp_min(1.0)
        weights["depth"] = config.depth
    if "normal" in buffers and config.normal > 0:
        hits = (rays[0] + rays[1] * out.depth).detach()  # where the predicted surface is seen
        normal = _numerical_normal(surface, hits, config.normal_step)
        cosine = (normal * buffers["normal"].reshape(total, 3)[pick]).sum(-1, keepdim=True)
        terms["normal"] = ((1.0 - cosine) * solid).sum() / solid.sum().clamp_min(1.0)
        weights["normal"] = config.normal
    if truth is not None and (config.sdf > 0 or config.surface_material > 0):
        uniform = torch.rand(config.sdf_points, 3, generator=generator).to(images.device) * 2 - 1
        with torch.no_grad():
            on = _projected(truth, uniform)
            near = (on + 0.1 * torch.randn(on.shape, generator=generator).to(on)).clamp(-1, 1)
            points = torch.cat([uniform, near])
            target = truth.sdf(points)
        if config.sdf > 0:
            terms["sdf"] = (surface.sdf(points) - target).abs().mean()
            weights["sdf"] = config.sdf
        if config.surface_material > 0:
            with torch.no_grad():
                on = _on_surface(truth, on)
                true = truth(on)
            predicted = surface(on)
            for name in ("albedo", "roughness", "metallic"):
                terms[f"surface_{name}"] = _material_error(name, getattr(predicted, name), getattr(true, name))
                weights[f"surface_{name}"] = config.surface_material
    terms["total"] = sum(weights[name] * value for name, value in terms.items())
    return terms


def surface_points(truth: SurfaceField, points: torch.Tensor) -> torch.Tensor:
    """Points [N, 3] projected onto a known surface, keeping those that land on it: [M, 3] (no gradient)."""
    with torch.no_grad():
        return _on_surface(truth, _projected(truth, points))


def _projected(truth: SurfaceField, points: torch.Tensor) -> torch.Tensor:
    """One Newton step along the unit SDF gradient: exact for exact distances, close for CSG blends."""
    return points - truth.sdf(points)[:, None] * _unit_gradient(truth, points)


def _on_surface(truth: SurfaceField, points: torch.Tensor) -> torch.Tensor:
    return points[truth.sdf(points).abs() < SURFACE_BAND]  # projections of far points can miss a CSG surface


def _material_error(name: str, predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """MSE of a material value; albedo is compared sRGB-encoded, as it is seen (roughness is perceptual already)."""
    if name == "albedo":
        predicted, true = linear_to_srgb(predicted), linear_to_srgb(true)
    return F.mse_loss(predicted, true.reshape(predicted.shape))


def _numerical_normal(surface: SurfaceField, points: torch.Tensor, step: float) -> torch.Tensor:
    """Unit SDF normals [N, 3] by central differences: gradients reach the SDF on both sides of the surface."""
    offsets = torch.eye(3, device=points.device, dtype=points.dtype) * step
    probes = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1)  # [N, 6, 3]
    sdf = surface.sdf(probes.reshape(-1, 3)).reshape(-1, 2, 3)
    return F.normalize(sdf[:, 0] - sdf[:, 1], dim=-1)


def _unit_gradient(field: SurfaceField, points: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        points = points.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(field.sdf(points).sum(), points)
    return F.normalize(gradient, dim=-1)

"""VolSDF volume rendering of a SurfaceField, shaded under an environment or with the field's radiance.

Along each ray, density is sigma = Laplace_CDF(-sdf; beta) / beta (VolSDF). Samples are placed in two
passes: uniform samples over the ray's segment inside the canonical box [-1, 1]^3, then inverse-CDF
resampling of the rendering weights, so most samples land near the surface whatever beta is.
Materials and normals are accumulated along the ray and shaded once per ray (deferred split-sum
shading), which matches how the exported mesh is shaded and costs one environment lookup per pixel.
The same code runs on CUDA and the CPU and is differentiable with respect to the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .cameras import Cameras, image_rays
from .field import FieldSample, SurfaceField
from .progress import Progress, no_progress
from .shading import Environment, shade


@dataclass(frozen=True)
class RenderOptions:
    samples: int = 64  # uniform samples per ray inside the box
    importance_samples: int = 64  # extra samples drawn from the uniform pass's weights
    chunk_rays: int = 4096  # rays per batch; bounds memory (each ray holds all its samples)
    jitter: bool = False  # random sample offsets (training); off gives deterministic images
    use_radiance: bool = False  # colour from the field's radiance head even when an environment is given
    # Normals (and the eikonal buffer) from one SDF gradient per ray, at the expected surface point, instead of
    # at every sample: autograd then runs over N points, not N x S (refinement's training renders use this).
    surface_normals: bool = False


@dataclass
class RenderOutput:
    """Per-ray buffers, each with a trailing channel dimension ([N, C] for rays, [V, H, W, C] for views).

    rgb, albedo, roughness and metallic are premultiplied by alpha (over black), as the volume integral
    yields them; alpha is the accumulated opacity. depth is the expected distance along the ray to the
    visible surface and normal its unit SDF-gradient normal (canonical frame), both zero where alpha is 0.
    eikonal is the mean (|grad sdf| - 1)^2 over the ray's samples, for refinement's regulariser.
    min_sdf is the smallest SDF sample on the ray (LIRM's offset left out): below 0 where the zero level set,
    the surface that becomes the mesh, covers the pixel; refinement's silhouette loss reads it.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor
    albedo: torch.Tensor
    roughness: torch.Tensor
    metallic: torch.Tensor
    eikonal: torch.Tensor
    min_sdf: torch.Tensor

    def composite(self, background: torch.Tensor | float) -> torch.Tensor:
        """rgb over a background colour or image (broadcastable to rgb)."""
        return self.rgb + (1.0 - self.alpha) * background

    def map(self, function) -> RenderOutput:
        """Apply function to every buffer (reshape, detach, move, ...)."""
        return RenderOutput(**{f.name: function(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(outputs: list[RenderOutput]) -> RenderOutput:
        return RenderOutput(**{f.name: torch.cat([getattr(o, f.name) for o in outputs]) for f in fields(RenderOutput)})


def ray_box_intersection(origins: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Near and far ray distances [N] through the box [-1, 1]^3 (slab method); far <= near means a miss.

    near is clamped at 0, so a camera inside the box starts at its own centre.
    """
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0, t1 = (-1.0 - origins) / safe, (1.0 - origins) / safe
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


def laplace_density(sdf: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """VolSDF density: the Laplace(0, beta) CDF of -sdf, scaled by 1 / beta."""
    half_tail = 0.5 * torch.exp(-sdf.abs() / beta)
    return torch.where(sdf > 0, half_tail, 1.0 - half_tail) / beta


def _weights(sdf: torch.Tensor, beta: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Rendering weights T_i * alpha_i of samples [N, S] with interval lengths deltas [N, S]."""
    optical_depth = laplace_density(sdf, beta) * deltas
    alpha = 1.0 - torch.exp(-optical_depth)
    transmittance = torch.exp(-torch.cumsum(optical_depth, dim=-1) + optical_depth)
    return alpha * transmittance


def _inverse_cdf(bins: torch.Tensor, weights: torch.Tensor, count: int, jitter: bool) -> torch.Tensor:
    """count distances per ray drawn from the piecewise-constant pdf of weights [N, B] over bins [N, B + 1]."""
    pdf = weights + 1e-4 * weights.sum(-1, keepdim=True).clamp_min(1e-6) + 1e-12  # never a zero-probability ray
    cdf = torch.cumsum(pdf / pdf.sum(-1, keepdim=True), dim=-1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], dim=-1)
    if jitter:
        u = (torch.arange(count, device=bins.device) + torch.rand(len(bins), count, device=bins.device)) / count
    else:
        u = ((torch.arange(count, device=bins.device) + 0.5) / count).expand(len(bins), count)
    index = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(1, bins.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, index - 1), cdf.gather(-1, index)
    bin_lo, bin_hi = bins.gather(-1, index - 1), bins.gather(-1, index)
    fraction = ((u - cdf_lo) / (cdf_hi - cdf_lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    return bin_lo + fraction * (bin_hi - bin_lo)


def _sample_distances(
    field: SurfaceField, origins: torch.Tensor, directions: torch.Tensor, options: RenderOptions
) -> torch.Tensor:
    """Sorted interval boundaries [N, S + 1] along each ray: uniform ones plus importance-sampled ones."""
    near, far = ray_box_intersection(origins, directions)
    far = torch.maximum(far, near)  # a miss gets an empty segment, hence zero opacity
    steps = torch.arange(options.samples + 1, device=origins.device, dtype=origins.dtype)
    if options.jitter:
        steps = steps + (torch.rand(len(origins), 1, device=origins.device) - 0.5).expand(-1, len(steps))
        steps = steps.clamp(0.0, options.samples)
    bins = near[:, None] + (far - near)[:, None] * steps / options.samples
    if options.importance_samples == 0:
        return bins
    with torch.no_grad():
        middles = 0.5 * (bins[:, 1:] + bins[:, :-1])
        points = origins[:, None] + directions[:, None] * middles[..., None]
        sdf = field.sdf(points.reshape(-1, 3)).reshape(middles.shape)
        # A tiny beta makes the coarse weights a step that can miss the interval holding the surface;
        # widening beta to the sample spacing for this pass spreads them over the neighbouring bins.
        spacing = ((far - near) / options.samples)[:, None]
        beta = torch.maximum(field.beta.detach(), spacing)
        weights = _weights(sdf, beta, bins.diff(dim=-1))
        extra = _inverse_cdf(bins, weights, options.importance_samples, options.jitter)
    return torch.sort(torch.cat([bins, extra], dim=-1), dim=-1).values


def render_rays(
    field: SurfaceField,
    origins: torch.Tensor,
    directions: torch.Tensor,
    environment: Environment | None = None,
    options: RenderOptions | None = None,
) -> RenderOutput:
    """Render rays [N, 3] (canonical frame, unit directions) through the field; buffers are [N, C].

    Colour is the field's materials shaded under `environment`, or the field's radiance head when no
    environment is given or `options.use_radiance` is set. Differentiable when called with gradients on.
    """
    options = options or RenderOptions()
    outputs = [
        _render_chunk(
            field,
            origins[start : start + options.chunk_rays],
            directions[start : start + options.chunk_rays],
            environment,
            options,
        )
        for start in range(0, len(origins), options.chunk_rays)
    ]
    if not outputs:
        empty = origins.new_zeros(0, 1)
        return RenderOutput(*(empty.expand(0, c) for c in (3, 1, 1, 3, 3, 1, 1, 1, 1)))
    return RenderOutput.cat(outputs)


def _render_chunk(
    field: SurfaceField,
    origins: torch.Tensor,
    directions: torch.Tensor,
    environment: Environment | None,
    options: RenderOptions,
) -> RenderOutput:
    differentiable = torch.is_grad_enabled()
    bins = _sample_distances(field, origins, directions, options).detach()
    distances = 0.5 * (bins[:, 1:] + bins[:, :-1])
    rays, samples = distances.shape
    points = (origins[:, None] + directions[:, None] * distances[..., None]).reshape(-1, 3)

    gradient = None
    if options.surface_normals:
        sample = field(points)
    else:
        # Normals are SDF gradients, so autograd runs even for callers under torch.no_grad(); the graph is
        # kept (create_graph) only when the caller wants gradients, e.g. for the eikonal or shading losses.
        gradient, sample = _sdf_gradient(field, points, differentiable)

    sdf = sample.sdf.reshape(rays, samples)
    min_sdf = sdf.amin(1, keepdim=True)
    if sample.offset is not None:
        sdf = sdf + sample.offset.reshape(rays, samples)
    weights = _weights(sdf, field.beta, bins.diff(dim=-1))[..., None]  # [rays, samples, 1]
    alpha = weights.sum(1)

    def accumulate(values: torch.Tensor) -> torch.Tensor:
        return (weights * values.reshape(rays, samples, -1)).sum(1)

    depth = accumulate(distances) / alpha.clamp_min(1e-6)
    if gradient is None:
        # One point per ray where its weights put the surface (inside the ray's segment, also for misses).
        surface = origins + directions * torch.minimum(torch.maximum(depth, bins[:, :1]), bins[:, -1:]).detach()
        gradient, _ = _sdf_gradient(field, surface, differentiable, sdf_only=True)
        eikonal = (gradient.norm(dim=-1, keepdim=True) - 1.0) ** 2
        normal = F.normalize(gradient, dim=-1)
    else:
        gradient = gradient.reshape(rays, samples, 3)
        eikonal = ((gradient.norm(dim=-1) - 1.0) ** 2).mean(1, keepdim=True)
        normal = F.normalize(accumulate(F.normalize(gradient, dim=-1)), dim=-1)
    albedo, roughness, metallic = accumulate(sample.albedo), accumulate(sample.roughness), accumulate(sample.metallic)

    if environment is not None and not options.use_radiance:
        unpremultiply = 1.0 / alpha.clamp_min(1e-6)
        colour = shade(
            normal,
            -directions,
            albedo * unpremultiply,
            (roughness * unpremultiply)[:, 0],
            (metallic * unpremultiply)[:, 0],
            environment,
        )
        rgb = colour * alpha
    elif sample.radiance is not None:
        rgb = accumulate(sample.radiance)
    else:
        raise ValueError("rendering needs an environment to shade under, or a field with a radiance head")
    return RenderOutput(rgb, alpha, depth * (alpha > 1e-6), normal, albedo, roughness, metallic, eikonal, min_sdf)


def _sdf_gradient(
    field: SurfaceField, points: torch.Tensor, differentiable: bool, sdf_only: bool = False
) -> tuple[torch.Tensor, FieldSample | None]:
    """The SDF gradient [N, 3] at points (graph kept when differentiable) and the field's values there."""
    with torch.enable_grad():
        points = points.detach().requires_grad_(True)
        sample = None if sdf_only else field(points)
        sdf = field.sdf(points) if sample is None else sample.sdf
        if not sdf.requires_grad:
            raise ValueError("the field's sdf is not differentiable with respect to the query points")
        (gradient,) = torch.autograd.grad(sdf.sum(), points, create_graph=differentiable)
    if not differentiable and sample is not None:
        sample = type(sample)(**{k: v.detach() if v is not None else None for k, v in vars(sample).items()})
    return gradient, sample


def render_views(
    field: SurfaceField,
    cameras: Cameras,
    environment: Environment | None = None,
    options: RenderOptions | None = None,
    progress: Progress = no_progress,
) -> RenderOutput:
    """Render every pixel of every camera (canonical frame); buffers are [V, H, W, C]."""
    options = options or RenderOptions()
    origins, directions = image_rays(cameras)
    shape = origins.shape[:-1]
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    outputs = []
    for start in range(0, len(origins), options.chunk_rays):
        end = start + options.chunk_rays
        outputs.append(render_rays(field, origins[start:end], directions[start:end], environment, options))
        progress("render", min(end, len(origins)) / len(origins))
    return RenderOutput.cat(outputs).map(lambda buffer: buffer.reshape(*shape, buffer.shape[-1]))


@torch.no_grad()
def peak_points(
    field: SurfaceField, origins: torch.Tensor, directions: torch.Tensor, options: RenderOptions | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample of highest rendering weight along each ray [N, 3] and that weight [N].

    LSRM §3.4 places an image token at the surface point its patch ray sees most: the opacity peak.
    A ray that sees no surface still gets its largest (tiny) weight's sample: callers check the weight.
    """
    options = options or RenderOptions()
    points, weights = [], []
    for start in range(0, len(origins), options.chunk_rays):
        o, d = origins[start : start + options.chunk_rays], directions[start : start + options.chunk_rays]
        bins = _sample_distances(field, o, d, options)
        distances = 0.5 * (bins[:, 1:] + bins[:, :-1])
        sdf = field.sdf((o[:, None] + d[:, None] * distances[..., None]).reshape(-1, 3)).reshape(distances.shape)
        weight, best = _weights(sdf, field.beta, bins.diff(dim=-1)).max(-1)
        points.append(o + d * distances.gather(-1, best[:, None]))
        weights.append(weight)
    if not points:
        return origins.new_zeros(0, 3), origins.new_zeros(0)
    return torch.cat(points), torch.cat(weights)

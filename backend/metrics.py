"""Quality metrics, Stanford-ORB style (DESIGN §9): relit images inside the object mask, and geometry.

Images are linear RGB [H, W, 3], premultiplied over black, as the renderers write them; masks [H, W]
are the ground truth's alpha (a pixel counts when alpha >= `mask_threshold`).
- PSNR-H: on the linear HDR values, with the peak taken as the ground truth's brightest masked value
  (HDR images have no fixed white; studio highlights reach tens of linear units).
- PSNR-L: on tone-mapped values, clipped to [0, 1] then sRGB-encoded (backend.colour), peak 1.
- SSIM: Gaussian-window SSIM (Wang et al. 2004: sigma 1.5, 11 taps, K1 0.01, K2 0.03) of the
  tone-mapped images, per channel; the SSIM map is averaged over the masked pixels only, so the
  window still sees the context around the object but the empty background never scores.
No per-channel scale alignment is applied: the evaluation knows the lighting, so a colour or
brightness error is a real error.

Geometry works on point samples of two surfaces with normals, both in the canonical box:
- Chamfer distance: the mean nearest-neighbour distance from A to B and from B to A, averaged
  (so a sphere against a concentric one larger by d scores d).
- Normal error: the mean angle in degrees between each point's normal and its nearest neighbour's
  on the other surface, averaged both ways. Normals are oriented (outward), so a flipped surface
  counts as wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .colour import linear_to_srgb


@dataclass(frozen=True)
class MetricsConfig:
    mask_threshold: float = 0.5  # ground-truth alpha at which a pixel belongs to the object
    ssim_sigma: float = 1.5  # Gaussian window of SSIM (Wang et al. 2004)
    ssim_radius: int = 5  # window half size: 11 taps
    ssim_k1: float = 0.01
    ssim_k2: float = 0.03
    neighbour_chunk: int = 2048  # query points per nearest-neighbour batch: bounds memory at chunk x M distances


# ----------------------------------------------------------------------------- images


def tone_map(linear: torch.Tensor) -> torch.Tensor:
    """The display encoding of PSNR-L and SSIM: clip to [0, 1], then sRGB."""
    return linear_to_srgb(linear.clamp(0.0, 1.0))


def _mask(mask: torch.Tensor, config: MetricsConfig) -> torch.Tensor:
    return mask >= config.mask_threshold if mask.dtype != torch.bool else mask


def psnr(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, peak: float) -> float:
    """PSNR in dB over the pixels where mask [H, W] (bool) is set; inf when they agree exactly."""
    if not mask.any():
        raise ValueError("the mask is empty: there are no pixels to score")
    mse = (prediction[mask] - target[mask]).double().square().mean().item()
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def psnr_hdr(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, config: MetricsConfig = MetricsConfig()
) -> float:
    """PSNR-H: linear values, peak = the target's brightest masked value."""
    mask = _mask(mask, config)
    peak = target[mask].max().item() if mask.any() else 1.0
    return psnr(prediction, target, mask, max(peak, 1e-6))


def psnr_ldr(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, config: MetricsConfig = MetricsConfig()
) -> float:
    """PSNR-L: tone-mapped (clipped, sRGB) values, peak 1."""
    return psnr(tone_map(prediction), tone_map(target), _mask(mask, config), 1.0)


def _gaussian_window(config: MetricsConfig, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(-config.ssim_radius, config.ssim_radius + 1, device=device, dtype=torch.float64)
    window = torch.exp(-0.5 * (offsets / config.ssim_sigma) ** 2)
    return window / window.sum()


def ssim_map(prediction: torch.Tensor, target: torch.Tensor, config: MetricsConfig = MetricsConfig()) -> torch.Tensor:
    """Per-pixel SSIM [H, W] of two images [H, W, C] in [0, 1], averaged over channels.

    The Gaussian filter is separable; borders are reflected so the map keeps the image's size.
    """
    window = _gaussian_window(config, prediction.device)
    taps, pad = len(window), config.ssim_radius
    channels = prediction.shape[-1]
    horizontal = window.view(1, 1, 1, taps).expand(channels, 1, 1, taps)
    vertical = window.view(1, 1, taps, 1).expand(channels, 1, taps, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        image = F.pad(image, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(F.conv2d(image, horizontal, groups=channels), vertical, groups=channels)

    x = prediction.double().permute(2, 0, 1)[None]
    y = target.double().permute(2, 0, 1)[None]
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    covariance = blur(x * y) - mu_x * mu_y
    c1, c2 = config.ssim_k1**2, config.ssim_k2**2  # the data range is 1
    ssim = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim[0].mean(0).float()


def ssim(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, config: MetricsConfig = MetricsConfig()
) -> float:
    """SSIM of the tone-mapped images, averaged over the masked pixels; 1.0 when they agree."""
    mask = _mask(mask, config)
    if not mask.any():
        raise ValueError("the mask is empty: there are no pixels to score")
    return ssim_map(tone_map(prediction), tone_map(target), config)[mask].mean().item()


def image_metrics(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, config: MetricsConfig = MetricsConfig()
) -> dict[str, float]:
    """PSNR-H, PSNR-L and SSIM of a predicted view against its ground truth, inside the mask."""
    return {
        "psnr_h": psnr_hdr(prediction, target, mask, config),
        "psnr_l": psnr_ldr(prediction, target, mask, config),
        "ssim": ssim(prediction, target, mask, config),
    }


# ----------------------------------------------------------------------------- geometry


def nearest_neighbours(
    queries: torch.Tensor, points: torch.Tensor, chunk: int = MetricsConfig.neighbour_chunk
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query [N, 3], the distance to its nearest point [M, 3] and that point's index; brute force in chunks."""
    if len(queries) == 0 or len(points) == 0:
        raise ValueError("nearest neighbours need at least one query and one point")
    indices = [
        torch.cdist(queries[start : start + chunk], points).argmin(dim=1) for start in range(0, len(queries), chunk)
    ]
    nearest = torch.cat(indices)
    # cdist's fast matrix-product form loses precision near zero; measure the chosen pairs directly.
    return (queries - points[nearest]).norm(dim=-1), nearest


def chamfer_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = MetricsConfig.neighbour_chunk) -> float:
    """Symmetric Chamfer distance between point sets [N, 3] and [M, 3]: the two mean NN distances, averaged."""
    a_to_b, _ = nearest_neighbours(a, b, chunk)
    b_to_a, _ = nearest_neighbours(b, a, chunk)
    return 0.5 * (a_to_b.mean().item() + b_to_a.mean().item())


def _angles_degrees(normals: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    cosine = (F.normalize(normals, dim=-1) * F.normalize(others, dim=-1)).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cosine))


def geometry_metrics(
    points_a: torch.Tensor,
    normals_a: torch.Tensor,
    points_b: torch.Tensor,
    normals_b: torch.Tensor,
    config: MetricsConfig = MetricsConfig(),
) -> dict[str, float]:
    """Chamfer distance and normal error (degrees) between two oriented point samples, one NN search each way."""
    a_to_b, nearest_in_b = nearest_neighbours(points_a, points_b, config.neighbour_chunk)
    b_to_a, nearest_in_a = nearest_neighbours(points_b, points_a, config.neighbour_chunk)
    angles_a = _angles_degrees(normals_a, normals_b[nearest_in_b])
    angles_b = _angles_degrees(normals_b, normals_a[nearest_in_a])
    return {
        "chamfer": 0.5 * (a_to_b.mean().item() + b_to_a.mean().item()),
        "normal_error_deg": 0.5 * (angles_a.mean().item() + angles_b.mean().item()),
    }


def normal_error(
    points_a: torch.Tensor,
    normals_a: torch.Tensor,
    points_b: torch.Tensor,
    normals_b: torch.Tensor,
    chunk: int = MetricsConfig.neighbour_chunk,
) -> float:
    """Mean angle in degrees between normals of nearest neighbours, averaged over both directions."""
    config = MetricsConfig(neighbour_chunk=chunk)
    return geometry_metrics(points_a, normals_a, points_b, normals_b, config)["normal_error_deg"]

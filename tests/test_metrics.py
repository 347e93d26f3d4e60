"""Metrics of backend/metrics.py against cases whose answer is known in closed form."""

import math

import pytest
import torch
import torch.nn.functional as F

from backend.metrics import (
    MetricsConfig,
    chamfer_distance,
    geometry_metrics,
    image_metrics,
    nearest_neighbours,
    normal_error,
    psnr_hdr,
    psnr_ldr,
    ssim,
)

SIZE = 48


def textured_image(seed: int = 0) -> torch.Tensor:
    """A smooth-ish random image [H, W, 3] in [0.05, 0.85]: structure for SSIM to see, never clipped."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, SIZE // 4, SIZE // 4, generator=generator)
    image = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return 0.05 + 0.8 * image


def full_mask() -> torch.Tensor:
    return torch.ones(SIZE, SIZE)


def blurred(image: torch.Tensor, width: int = 5) -> torch.Tensor:
    kernel = torch.ones(3, 1, width, width) / width**2
    return F.conv2d(image.permute(2, 0, 1)[None], kernel, padding=width // 2, groups=3)[0].permute(1, 2, 0)


def fibonacci_sphere(count: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spread points on a sphere at the origin and their outward normals."""
    index = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * index / count
    azimuth = index * math.pi * (3.0 - math.sqrt(5.0))
    ring = (1.0 - z**2).sqrt()
    normals = torch.stack([ring * azimuth.cos(), ring * azimuth.sin(), z], dim=-1).float()
    return radius * normals, normals


def test_identical_images_score_infinite_psnr_and_unit_ssim():
    image = textured_image()
    scores = image_metrics(image, image.clone(), full_mask())
    assert scores["psnr_h"] == math.inf and scores["psnr_l"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-9)


def test_psnr_of_known_noise():
    image = textured_image()
    sigma = 0.01
    signs = torch.randint(0, 2, image.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noisy = image + sigma * signs  # every error exactly +-sigma: MSE = sigma^2 in linear values
    peak = image.max().item()
    assert psnr_hdr(noisy, image, full_mask()) == pytest.approx(10 * math.log10(peak**2 / sigma**2), abs=1e-4)
    # PSNR-L sees the same noise through the sRGB curve: it is steeper than 1 below ~0.2, shallower above.
    assert 30.0 < psnr_ldr(noisy, image, full_mask()) < 45.0


def test_psnr_l_clips_highlights_that_psnr_h_counts():
    image = textured_image()
    hdr = image.clone()
    hdr[:8, :8] = 20.0  # a highlight
    brighter = hdr.clone()
    brighter[:8, :8] = 30.0  # brighter still: both display as white
    assert psnr_ldr(brighter, hdr, full_mask()) == math.inf
    assert math.isfinite(psnr_hdr(brighter, hdr, full_mask()))


def test_ssim_drops_as_blur_grows():
    image = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(2)) * 0.8  # fine detail to lose
    mild, strong = ssim(blurred(image, 3), image, full_mask()), ssim(blurred(image, 7), image, full_mask())
    assert 1.0 > mild > strong > 0.0


def test_masks_are_respected():
    image = textured_image()
    broken = image.clone()
    broken[:, SIZE // 2 :] = torch.rand(SIZE, SIZE - SIZE // 2, 3, generator=torch.Generator().manual_seed(3))
    left = torch.zeros(SIZE, SIZE)
    left[:, : SIZE // 2 - MetricsConfig.ssim_radius - 1] = 1.0  # keep SSIM's window clear of the broken half
    scores = image_metrics(broken, image, left)
    assert scores["psnr_h"] == math.inf and scores["psnr_l"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert image_metrics(broken, image, full_mask())["psnr_l"] < 20.0
    # Soft masks count from the threshold up; an empty mask is an error, never a number.
    below = left * (MetricsConfig.mask_threshold - 0.01)
    with pytest.raises(ValueError, match="empty"):
        image_metrics(broken, image, below)


def test_chamfer_of_concentric_spheres_is_the_radius_difference():
    inner, _ = fibonacci_sphere(1500, 0.5)
    outer, _ = fibonacci_sphere(2000, 0.6)
    # Samples sit ~0.04 apart, so each point's nearest neighbour on the other sphere is almost straight out or in.
    assert chamfer_distance(inner, outer, chunk=512) == pytest.approx(0.1, rel=0.05)
    assert chamfer_distance(inner, inner) == 0.0


def test_nearest_neighbours_in_chunks_match_one_batch():
    generator = torch.Generator().manual_seed(4)
    queries, points = torch.rand(500, 3, generator=generator), torch.rand(300, 3, generator=generator)
    one = nearest_neighbours(queries, points, chunk=10_000)
    chunked = nearest_neighbours(queries, points, chunk=7)
    assert torch.equal(one[1], chunked[1]) and torch.allclose(one[0], chunked[0])


def test_normal_error_is_zero_for_identical_surfaces_and_180_for_flipped_ones():
    points, normals = fibonacci_sphere(1500, 0.5)
    assert normal_error(points, normals, points, normals) == pytest.approx(0.0, abs=1e-2)
    assert normal_error(points, normals, points, -normals) == pytest.approx(180.0, abs=1e-2)
    scores = geometry_metrics(points, normals, *fibonacci_sphere(2000, 0.6), MetricsConfig(neighbour_chunk=256))
    assert scores["chamfer"] == pytest.approx(0.1, rel=0.05)
    assert 0.0 < scores["normal_error_deg"] < 5.0  # neighbours on a dense concentric sphere point almost alike

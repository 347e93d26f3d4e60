"""bench/token_seams.py's measures: a smooth SDF has no seams and no per-token error; per-token pieces do."""

from __future__ import annotations

import torch

from bench.token_seams import periodic_error, seam_ratio

R, UPSAMPLE = 16, 4
x, y, z = torch.meshgrid(*[torch.arange(R, dtype=torch.float32)] * 3, indexing="ij")
EVERYWHERE = torch.ones(R, R, R, dtype=torch.bool)


def test_a_smooth_field_has_a_seam_ratio_of_one_and_no_periodic_error() -> None:
    plane = 0.1 * x + 0.05 * y - 0.02 * z
    assert abs(seam_ratio(plane, EVERYWHERE, UPSAMPLE) - 1.0) < 1e-5
    assert periodic_error(plane - plane, EVERYWHERE, UPSAMPLE) == 0.0


def test_a_field_of_per_token_pieces_steps_at_the_borders() -> None:
    # steps of 0.05 along every axis, and 0.4 more across each token border along x
    field = 0.4 * torch.div(x, UPSAMPLE, rounding_mode="floor") + 0.05 * (x + y + z)
    assert abs(seam_ratio(field, EVERYWHERE, UPSAMPLE) - (0.45 + 0.05 + 0.05) / 3 / 0.05) < 1e-4
    # only steps between two near voxels count: without the last voxel of each token along x, no x border is left
    assert abs(seam_ratio(field, x % UPSAMPLE != UPSAMPLE - 1, UPSAMPLE) - 1.0) < 1e-4


def test_the_periodic_error_is_the_spread_of_the_pattern_repeated_in_every_token() -> None:
    dome = (x % UPSAMPLE - 1.5) ** 2  # 2.25, 0.25, 0.25, 2.25 in every token along x
    expected = torch.tensor([2.25, 0.25, 0.25, 2.25]).repeat_interleave(UPSAMPLE**2).std()
    assert abs(periodic_error(dome, EVERYWHERE, UPSAMPLE) - float(expected)) < 1e-5
    noise = torch.randn(R, R, R, generator=torch.Generator().manual_seed(0))
    assert periodic_error(noise, EVERYWHERE, UPSAMPLE) < 0.3  # averaged over 64 tokens, noise mostly cancels

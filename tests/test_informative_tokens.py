"""Stage 2's informative voxels (LSRM eq. 13) against brute force, and the image tokens' 3D points."""

import math

import pytest
import torch

from backend.data.synthetic import random_object
from backend.field import near_surface_voxels, voxel_centres
from backend.model.config import CONFIGS
from backend.model.lsrm import LSRM
from backend.model.sparse import informative_voxels

RESOLUTION, THRESHOLD, SUBSAMPLES = 32, 1.0, 3


class Shifted:
    """A field's SDF moved so that its zero level set passes through the box (random weights have none)."""

    def __init__(self, sdf, level: float) -> None:
        self._sdf, self.level = sdf, level

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return self._sdf(points) - self.level


def sub_points(voxels: torch.Tensor, resolution: int, subsamples: int) -> torch.Tensor:
    """[M, subsamples^3, 3]: the uniform sub-points of each voxel."""
    steps = (torch.arange(subsamples) + 0.5) / subsamples - 0.5
    offsets = torch.cartesian_prod(steps, steps, steps) * (2.0 / resolution)
    return voxel_centres(voxels, resolution)[:, None] + offsets


def eq13(sdf, voxels: torch.Tensor) -> torch.Tensor:
    """The voxels among `voxels` with some sub-point inside the band: eq. 13 read literally."""
    points = sub_points(voxels, RESOLUTION, SUBSAMPLES)
    near = sdf(points.reshape(-1, 3)).abs().reshape(len(voxels), -1).amin(1) < THRESHOLD * 2.0 / RESOLUTION
    return voxels[near]


def every_voxel() -> torch.Tensor:
    axis = torch.arange(RESOLUTION)
    return torch.cartesian_prod(axis, axis, axis)


@pytest.mark.parametrize("name", ["sphere", "synthetic object"])
def test_informative_voxels_equal_eq13_over_every_voxel(name: str) -> None:
    """For a true distance field (1-Lipschitz) the coarse-to-fine search misses nothing eq. 13 keeps."""
    sdf = (lambda p: p.norm(dim=-1) - 0.6) if name == "sphere" else random_object(5).sdf
    field = Shifted(sdf, 0.0)
    chosen = informative_voxels(field, RESOLUTION, THRESHOLD, SUBSAMPLES, torch.device("cpu"))
    want = eq13(field.sdf, every_voxel())
    assert len(chosen) > 100
    assert torch.equal(keys(chosen).sort().values, keys(want))  # every_voxel() is in key order


@pytest.mark.parametrize("seed", [0])
@torch.no_grad()
def test_informative_voxels_keep_the_order_and_set_on_random_model_fields(seed: int) -> None:
    """A random tiny model's field is far from a distance field; whatever the candidate pass finds, the
    centre shortcut must keep exactly the candidates that some sub-point puts in the band, in order."""
    torch.manual_seed(seed)
    model = LSRM(CONFIGS["tiny"]).eval()
    resolution = model.config.field.dense_resolution
    dense = torch.randn(model.config.channels, resolution, resolution, resolution)
    grid = model.field(dense)
    level = float(grid.sdf(torch.rand(4096, 3) * 2 - 1).median())
    field = Shifted(grid.sdf, level)
    chosen = informative_voxels(field, RESOLUTION, THRESHOLD, SUBSAMPLES, torch.device("cpu"))
    voxel = 2.0 / RESOLUTION
    candidates = near_surface_voxels(field.sdf, RESOLUTION, THRESHOLD * voxel + 0.5 * math.sqrt(3.0) * voxel)
    assert len(chosen) > 50
    assert torch.equal(chosen, eq13(field.sdf, candidates))


def keys(voxels: torch.Tensor) -> torch.Tensor:
    return (voxels[:, 0] * RESOLUTION + voxels[:, 1]) * RESOLUTION + voxels[:, 2]

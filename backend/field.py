"""The field: what every engine produces and everything downstream consumes.

A field answers, for points in the canonical box [-1, 1]^3, a signed distance (negative inside)
and PBR materials. The renderer, marching cubes and the texture baker accept any object with
this interface: the learned `FeatureField` below and the analytic synthetic objects alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class FieldSample:
    """Field values at N points. Colours are linear; all values are per point."""

    sdf: torch.Tensor  # [N] signed distance in canonical units, negative inside
    albedo: torch.Tensor  # [N, 3] linear base colour in [0, 1]
    roughness: torch.Tensor  # [N] perceptual roughness in [0, 1] (glTF / Blender meaning)
    metallic: torch.Tensor  # [N] in [0, 1]
    radiance: torch.Tensor | None = None  # [N, 3] optional emitted colour (novel-view mode)


class SurfaceField(Protocol):
    """Anything that can be rendered, meshed and baked."""

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance [N] at points [N, 3]; cheaper than a full query."""
        ...

    def __call__(self, points: torch.Tensor) -> FieldSample:
        """All field values at points [N, 3]."""
        ...

    @property
    def beta(self) -> torch.Tensor:
        """VolSDF's Laplace scale (canonical units): smaller is a sharper surface."""
        ...

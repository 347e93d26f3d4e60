"""Analytic fields for tests: the smallest SurfaceFields there are."""

import torch

from backend.field import FieldSample


class UniformSphere:
    """A sphere at the origin with one material everywhere (and optionally a radiance colour)."""

    def __init__(
        self,
        radius: float,
        albedo=(0.5, 0.5, 0.5),
        roughness: float = 0.6,
        metallic: float = 0.0,
        radiance=None,
        beta: float = 0.005,
    ) -> None:
        self.radius, self.roughness, self.metallic = radius, roughness, metallic
        self.albedo = torch.tensor(albedo, dtype=torch.float32)
        self.radiance = None if radiance is None else torch.tensor(radiance, dtype=torch.float32)
        self._beta = torch.tensor(beta)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return points.norm(dim=-1) - self.radius

    def __call__(self, points: torch.Tensor) -> FieldSample:
        count = len(points)
        return FieldSample(
            sdf=self.sdf(points),
            albedo=self.albedo.expand(count, 3),
            roughness=torch.full((count,), self.roughness),
            metallic=torch.full((count,), self.metallic),
            radiance=None if self.radiance is None else self.radiance.expand(count, 3),
        )

    @property
    def beta(self) -> torch.Tensor:
        return self._beta

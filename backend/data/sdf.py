"""Signed distance primitives and smooth CSG, in torch so they run on any device and differentiate.

Every primitive is an exact Euclidean distance in its local frame (|grad| = 1 almost everywhere),
centred at the origin, with its axis along local Z. A `Placement` (rotation, translation, uniform
scale) puts it in the parent frame; a uniform scale multiplies distances, so they stay exact.
Smooth unions use the polynomial smooth-min, whose blend is confined to a band of width `blend`:
outside that band the combined field is the plain min/max and still a distance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def sphere(p: Tensor, radius: float) -> Tensor:
    return p.norm(dim=-1) - radius


def rounded_box(p: Tensor, half_x: float, half_y: float, half_z: float, rounding: float) -> Tensor:
    """Box of half extents (x, y, z) whose edges are rounded by `rounding` (inside the extents)."""
    half = torch.tensor([half_x, half_y, half_z], dtype=p.dtype, device=p.device)
    q = p.abs() - half + rounding
    outside = q.clamp_min(0.0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp_max(0.0)
    return outside + inside - rounding


def capsule(p: Tensor, half_length: float, radius: float) -> Tensor:
    """Segment from z = -half_length to +half_length, thickened by `radius`."""
    z = p[..., 2] - p[..., 2].clamp(-half_length, half_length)
    return torch.stack([p[..., 0], p[..., 1], z], dim=-1).norm(dim=-1) - radius


def cylinder(p: Tensor, radius: float, half_height: float, rounding: float) -> Tensor:
    """Capped cylinder around Z with rounded rims."""
    radial = p[..., :2].norm(dim=-1) - radius + rounding
    axial = p[..., 2].abs() - half_height + rounding
    q = torch.stack([radial, axial], dim=-1)
    return q.clamp_min(0.0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0.0) - rounding


def torus(p: Tensor, major_radius: float, minor_radius: float) -> Tensor:
    """Ring in the XY plane."""
    ring = p[..., :2].norm(dim=-1) - major_radius
    return torch.stack([ring, p[..., 2]], dim=-1).norm(dim=-1) - minor_radius


def capped_cone(p: Tensor, half_height: float, bottom_radius: float, top_radius: float, rounding: float) -> Tensor:
    """Truncated cone around Z, radius `bottom_radius` at z = -h and `top_radius` at z = +h, rims rounded.

    The exact distance to a trapezoid in the (radius, height) half-plane is the length of an offset
    vector, which vanishes on the boundary and leaves no gradient there; measuring from a trapezoid
    shrunk by `rounding` and subtracting it keeps the surface away from that singularity.
    """
    h, r1, r2 = half_height - rounding, bottom_radius - rounding, top_radius - rounding
    q = torch.stack([p[..., :2].norm(dim=-1), p[..., 2]], dim=-1)
    cap_radius = torch.where(q[..., 1] < 0.0, r1, r2)
    to_caps = torch.stack([q[..., 0] - torch.minimum(q[..., 0], cap_radius), q[..., 1].abs() - h], dim=-1)
    top = torch.tensor([r2, h], dtype=p.dtype, device=p.device)
    slant = torch.tensor([r2 - r1, 2.0 * h], dtype=p.dtype, device=p.device)
    along = (((top - q) * slant).sum(-1) / slant.dot(slant)).clamp(0.0, 1.0)
    to_side = q - top + slant * along[..., None]
    inside = (to_side[..., 0] < 0.0) & (to_caps[..., 1] < 0.0)
    nearer = torch.where((to_caps.square().sum(-1) < to_side.square().sum(-1))[..., None], to_caps, to_side)
    distance = nearer.norm(dim=-1)
    return torch.where(inside, -distance, distance) - rounding


PRIMITIVES: dict[str, Callable[..., Tensor]] = {
    "sphere": sphere,
    "rounded_box": rounded_box,
    "capsule": capsule,
    "cylinder": cylinder,
    "torus": torus,
    "capped_cone": capped_cone,
}


def smooth_min(a: Tensor, b: Tensor, blend: float) -> tuple[Tensor, Tensor]:
    """Polynomial smooth minimum of a and b, and the weight of a in the blend (1 where a wins outright)."""
    blend = max(blend, 1e-6)
    weight_a = (0.5 + 0.5 * (b - a) / blend).clamp(0.0, 1.0)
    value = torch.lerp(b, a, weight_a) - blend * weight_a * (1.0 - weight_a)
    return value, weight_a


def smooth_union(a: Tensor, b: Tensor, blend: float) -> Tensor:
    return smooth_min(a, b, blend)[0]


def smooth_intersection(a: Tensor, b: Tensor, blend: float) -> Tensor:
    return -smooth_min(-a, -b, blend)[0]


def smooth_subtraction(a: Tensor, b: Tensor, blend: float) -> Tensor:
    """a with b carved out of it."""
    return smooth_intersection(a, -b, blend)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (Shoemake's uniform unit quaternion)."""
    u1, u2, u3 = rng.random(3)
    w, x, y, z = (
        np.sqrt(1 - u1) * np.sin(2 * np.pi * u2),
        np.sqrt(1 - u1) * np.cos(2 * np.pi * u2),
        np.sqrt(u1) * np.sin(2 * np.pi * u3),
        np.sqrt(u1) * np.cos(2 * np.pi * u3),
    )
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass(frozen=True)
class Placement:
    """A similarity from a part's local frame to its parent: parent = scale * rotation @ local + translation."""

    rotation: Tensor  # [3, 3]
    translation: Tensor  # [3]
    scale: float

    def to_local(self, points: Tensor) -> Tensor:
        """Parent-frame points [N, 3] in the local frame (row vectors, so @ R is R^T per point)."""
        return (points - self.translation.to(points)) @ self.rotation.to(points) / self.scale

    def then(self, scale: float, offset: Tensor) -> Placement:
        """This placement followed by parent' = scale * parent + offset."""
        return Placement(self.rotation, scale * self.translation + offset.to(self.translation), scale * self.scale)

    def to(self, device: torch.device | str) -> Placement:
        return Placement(self.rotation.to(device), self.translation.to(device), self.scale)


@dataclass(frozen=True)
class Part:
    """One primitive placed in the object, added to or carved from what came before it."""

    kind: str  # a key of PRIMITIVES
    params: tuple[float, ...]
    placement: Placement
    carve: bool = False  # False: smooth union; True: smooth subtraction

    def local_distance(self, local_points: Tensor) -> Tensor:
        return PRIMITIVES[self.kind](local_points, *self.params)


class CSG:
    """Parts combined in order by smooth union or subtraction, tracking which part each point belongs to."""

    def __init__(self, parts: Sequence[Part], blend: float) -> None:
        if not parts or parts[0].carve:
            raise ValueError("a CSG needs at least one part and cannot start by carving")
        self.parts, self.blend = list(parts), blend

    def evaluate(self, points: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Distance [N], per-part blend weights [P, N] (summing to 1) and each part's local points [N, 3].

        A carved part removes volume but keeps the material of what it cuts into, so its weight stays 0.
        """
        local_points = [part.placement.to_local(points) for part in self.parts]
        distances = [
            part.placement.scale * part.local_distance(q) for part, q in zip(self.parts, local_points, strict=True)
        ]
        distance = distances[0]
        weights = [torch.ones_like(distance)] + [torch.zeros_like(distance)] * (len(self.parts) - 1)
        for index in range(1, len(self.parts)):
            if self.parts[index].carve:
                distance = smooth_subtraction(distance, distances[index], self.blend)
                continue
            distance, weight_so_far = smooth_min(distance, distances[index], self.blend)
            weights = [w * weight_so_far for w in weights[:index]] + [1.0 - weight_so_far] + weights[index + 1 :]
        return distance, torch.stack(weights), local_points

    def distance(self, points: Tensor) -> Tensor:
        return self.evaluate(points)[0]

    def then(self, scale: float, offset: Tensor) -> CSG:
        """The same shape mapped by parent' = scale * parent + offset (distances scale with it)."""
        parts = [Part(part.kind, part.params, part.placement.then(scale, offset), part.carve) for part in self.parts]
        return CSG(parts, self.blend * scale)

    def to(self, device: torch.device | str) -> CSG:
        parts = [Part(part.kind, part.params, part.placement.to(device), part.carve) for part in self.parts]
        return CSG(parts, self.blend)

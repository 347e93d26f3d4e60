"""Cameras: the one convention conversion, rays, Plücker coordinates, projection, canonical box.

Conventions (DESIGN §3), written here once:
- World is Blender's: right-handed, Z up, metres.
- Bundles carry camera-to-world matrices in the OpenGL convention (camera looks down -Z, Y up).
  Inside the backend every camera is in the OpenCV convention (looks down +Z, Y down);
  `opengl_to_opencv` is the only place that converts.
- Intrinsics are (fx, fy, cx, cy) in pixels on a continuous image plane spanning [0, W] x [0, H]
  with row 0 at the top; the centre of pixel (i, j) is at (j + 0.5, i + 0.5) (nerfstudio's rule).
- Plücker coordinates of a ray with origin o and unit direction d are (d, o x d).
- The canonical box is [-1, 1]^3: canonical = (world - centre) * scale, with one uniform scale so
  SDF values and angles survive the mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Negating the camera's Y and Z axes turns an OpenGL camera into an OpenCV one and back.
_GL_CV_FLIP = torch.tensor([1.0, -1.0, -1.0, 1.0])


def opengl_to_opencv(c2w: torch.Tensor) -> torch.Tensor:
    """Convert camera-to-world matrices [..., 4, 4] between OpenGL and OpenCV conventions.

    The conversion is its own inverse, so the same function also maps OpenCV back to OpenGL.
    """
    return c2w * _GL_CV_FLIP.to(c2w)


@dataclass(frozen=True)
class Cameras:
    """A batch of pinhole cameras of one resolution, in the OpenCV convention."""

    c2w: torch.Tensor  # [V, 4, 4] camera-to-world, OpenCV convention
    intrinsics: torch.Tensor  # [V, 4] fx, fy, cx, cy in pixels
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.c2w.ndim != 3 or self.c2w.shape[1:] != (4, 4):
            raise ValueError(f"c2w must be [V, 4, 4], got {tuple(self.c2w.shape)}")
        if self.intrinsics.shape != (self.c2w.shape[0], 4):
            raise ValueError(f"intrinsics must be [V, 4], got {tuple(self.intrinsics.shape)}")

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index) -> Cameras:
        c2w, intrinsics = self.c2w[index], self.intrinsics[index]
        if c2w.ndim == 2:
            c2w, intrinsics = c2w[None], intrinsics[None]
        return Cameras(c2w, intrinsics, self.width, self.height)

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def centres(self) -> torch.Tensor:
        """Camera centres in world space, [V, 3]."""
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.c2w.to(device), self.intrinsics.to(device), self.width, self.height)

    def resized(self, width: int, height: int) -> Cameras:
        """The same cameras seeing the same field of view at another resolution."""
        # Built in the intrinsics' dtype: a float32 detour would round float64 cameras.
        scale = torch.tensor(
            [width / self.width, height / self.height] * 2, dtype=self.intrinsics.dtype, device=self.device
        )
        return Cameras(self.c2w, self.intrinsics * scale, width, height)

    def world_to_camera(self) -> torch.Tensor:
        """World-to-camera matrices [V, 4, 4] (rigid inverse, no general matrix inversion)."""
        rotation, translation = self.c2w[:, :3, :3], self.c2w[:, :3, 3:]
        w2c = torch.zeros_like(self.c2w)
        w2c[:, :3, :3] = rotation.transpose(1, 2)
        w2c[:, :3, 3:] = -rotation.transpose(1, 2) @ translation
        w2c[:, 3, 3] = 1.0
        return w2c


def pixel_centres(width: int, height: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Image-plane coordinates (u, v) of every pixel centre, [H, W, 2], row-major from the top."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def pixel_rays(cameras: Cameras, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through image-plane points.

    pixels: [V, ..., 2] coordinates (u, v) per view. Returns origins and unit directions, [V, ..., 3].
    """
    views = len(cameras)
    flat = pixels.reshape(views, -1, 2).to(cameras.c2w)
    origins, directions = _rays(cameras.c2w, cameras.intrinsics, flat)
    shape = (*pixels.shape[:-1], 3)
    return origins.reshape(shape), directions.reshape(shape)


def picked_pixel_rays(cameras: Cameras, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays [N, 3] through the centres of chosen pixels, `picked` [N] being flat indices into [V, H, W]:
    what `image_rays(cameras)` reshaped to [V * H * W, 3] holds at those rows, without making every ray."""
    pixels_per_view = cameras.width * cameras.height
    view = picked // pixels_per_view
    row, column = (picked % pixels_per_view) // cameras.width, picked % cameras.width
    centres = torch.stack([column, row], dim=-1).to(cameras.c2w) + 0.5
    origins, directions = _rays(cameras.c2w[view], cameras.intrinsics[view], centres[:, None])
    return origins[:, 0], directions[:, 0]


def _rays(c2w: torch.Tensor, intrinsics: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and unit directions [B, M, 3] through image-plane points [B, M, 2] of B cameras (c2w [B, 4, 4],
    intrinsics [B, 4] as fx, fy, cx, cy)."""
    fx, fy, cx, cy = intrinsics[:, None].unbind(-1)
    x = (pixels[..., 0] - cx) / fx
    y = (pixels[..., 1] - cy) / fy
    directions_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    directions = directions_cam @ c2w[:, :3, :3].transpose(1, 2)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    origins = c2w[:, None, :3, 3].expand_as(directions)
    return origins, directions


def image_rays(cameras: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through every pixel centre of every view: origins and directions, [V, H, W, 3]."""
    pixels = pixel_centres(cameras.width, cameras.height, cameras.device)
    pixels = pixels.expand(len(cameras), -1, -1, -1)
    return pixel_rays(cameras, pixels)


def plucker(origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Plücker coordinates (d, o x d) of rays, [..., 6]; directions are normalised first."""
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return torch.cat([directions, torch.linalg.cross(origins, directions, dim=-1)], dim=-1)


def project(cameras: Cameras, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points [N, 3] into every view.

    Returns image-plane coordinates (u, v) [V, N, 2] and camera-space depth along +Z [V, N]
    (positive in front of the camera).
    """
    w2c = cameras.world_to_camera()
    camera_points = points.to(w2c)[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    depth = camera_points[..., 2]
    fx, fy, cx, cy = (c[:, None] for c in cameras.intrinsics.unbind(-1))
    safe = torch.where(depth.abs() > 1e-12, depth, torch.full_like(depth, 1e-12))
    u = fx * camera_points[..., 0] / safe + cx
    v = fy * camera_points[..., 1] / safe + cy
    return torch.stack([u, v], dim=-1), depth


@dataclass(frozen=True)
class Normalisation:
    """The similarity that maps the region of interest into the canonical box [-1, 1]^3."""

    centre: torch.Tensor  # [3] world-space point that maps to the origin
    scale: float  # canonical units per world unit

    @staticmethod
    def from_aabb(aabb: torch.Tensor, margin: float = 0.1) -> Normalisation:
        """Fit the box aabb [2, 3] (min, max) into [-(1 - margin), 1 - margin]^3, uniformly scaled."""
        aabb = torch.as_tensor(aabb, dtype=torch.float32)
        half_extent = float((aabb[1] - aabb[0]).max()) / 2.0
        if not half_extent > 0.0:
            raise ValueError("the region of interest has no extent")
        return Normalisation(centre=(aabb[0] + aabb[1]) / 2.0, scale=(1.0 - margin) / half_extent)

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        return (points - self.centre.to(points)) * self.scale

    def to_world(self, points: torch.Tensor) -> torch.Tensor:
        return points / self.scale + self.centre.to(points)

    def canonical_to_world_matrix(self) -> torch.Tensor:
        """4x4 matrix taking canonical homogeneous points to world space."""
        matrix = torch.eye(4)
        matrix[:3, :3] /= self.scale
        matrix[:3, 3] = self.centre
        return matrix

    def cameras_to_canonical(self, cameras: Cameras) -> Cameras:
        """The same cameras seen in the canonical frame (a uniform scale leaves intrinsics alone)."""
        c2w = cameras.c2w.clone()
        c2w[:, :3, 3] = self.to_canonical(c2w[:, :3, 3])
        return Cameras(c2w, cameras.intrinsics, cameras.width, cameras.height)

    def cameras_to_world(self, cameras: Cameras) -> Cameras:
        """Inverse of `cameras_to_canonical`: canonical-frame cameras back in world space."""
        c2w = cameras.c2w.clone()
        c2w[:, :3, 3] = self.to_world(c2w[:, :3, 3])
        return Cameras(c2w, cameras.intrinsics, cameras.width, cameras.height)

    def world_to_canonical_matrix(self) -> torch.Tensor:
        """4x4 matrix taking world homogeneous points to the canonical box (inverse of the above)."""
        matrix = torch.eye(4)
        matrix[:3, :3] *= self.scale
        matrix[:3, 3] = -self.centre * self.scale
        return matrix


def viewed_region(cameras: Cameras) -> torch.Tensor:
    """A box [2, 3] (min, max) that holds whatever all cameras look at.

    Its centre is the point closest, in least squares, to every optical axis; its half size is the
    distance from there to the nearest camera, since the object cannot enclose a camera.
    Raises ValueError when the optical axes are (nearly) parallel and meet nowhere.
    """
    c2w = cameras.c2w.double()
    axes = c2w[:, :3, 2]  # OpenCV: the camera looks down its +Z column
    centres = c2w[:, :3, 3]
    # Sum of projectors onto each axis' normal plane: the normal equations of "closest to all lines".
    normal_planes = torch.eye(3, dtype=c2w.dtype) - axes[:, :, None] * axes[:, None, :]
    system = normal_planes.sum(0)
    if torch.linalg.eigvalsh(system)[0] < 1e-3 * len(cameras):
        raise ValueError("the cameras' optical axes do not converge on a region")
    focus = torch.linalg.solve(system, (normal_planes @ centres[:, :, None]).sum(0))[:, 0]
    half = (centres - focus).norm(dim=-1).min()
    return torch.stack([focus - half, focus + half]).float()


def visual_hull(
    cameras: Cameras,
    masks: torch.Tensor,
    bounds: torch.Tensor,
    resolution: int,
    threshold: float = 0.5,
    min_views: int | None = None,
) -> torch.Tensor:
    """Carve a voxel grid with the silhouettes: occupancy [R, R, R] bool, indexed [x, y, z].

    Voxel centres sit on a regular grid inside bounds [2, 3] (world units, min and max). A voxel
    survives when no view that sees it puts it outside the mask (mask < threshold), and at least
    `min_views` views see it (default: all of them, the usual capture where the object stays in
    frame; lower it when the object leaves some frames).
    """
    views = len(cameras)
    min_views = views if min_views is None else min_views
    bounds = bounds.to(cameras.c2w)
    steps = [torch.linspace(0.0, 1.0, 2 * resolution + 1, device=cameras.device)[1::2]] * 3
    unit = torch.stack(torch.meshgrid(*steps, indexing="ij"), dim=-1).reshape(-1, 3)
    centres = bounds[0] + unit.to(bounds) * (bounds[1] - bounds[0])
    masks = masks.to(cameras.device)

    occupied = torch.ones(len(centres), dtype=torch.bool, device=cameras.device)
    seen_by = torch.zeros(len(centres), dtype=torch.int32, device=cameras.device)
    for view in range(views):
        for start in range(0, len(centres), 1 << 20):
            chunk = slice(start, start + (1 << 20))
            uv, depth = project(cameras[view], centres[chunk])
            u, v, depth = uv[0, :, 0], uv[0, :, 1], depth[0]
            seen = (depth > 0) & (u >= 0) & (u < cameras.width) & (v >= 0) & (v < cameras.height)
            column = u.floor().long().clamp(0, cameras.width - 1)
            row = v.floor().long().clamp(0, cameras.height - 1)
            outside_silhouette = masks[view, row, column] < threshold
            occupied[chunk] &= ~(seen & outside_silhouette)
            seen_by[chunk] += seen.int()
    occupied &= seen_by >= min_views
    return occupied.reshape(resolution, resolution, resolution)


def occupied_bounds(occupancy: torch.Tensor, bounds: torch.Tensor, padding: int = 1) -> torch.Tensor:
    """World box [2, 3] around the occupied voxels of a grid over bounds, padded by whole voxels."""
    resolution = torch.tensor(occupancy.shape, device=bounds.device)
    voxel = (bounds[1] - bounds[0]) / resolution
    indices = occupancy.nonzero()
    if len(indices) == 0:
        raise ValueError("no voxel is occupied")
    low = bounds[0] + (indices.min(0).values - padding).to(bounds) * voxel
    high = bounds[0] + (indices.max(0).values + 1 + padding).to(bounds) * voxel
    return torch.stack([low, high])

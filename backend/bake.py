"""Texture baking: a UV atlas for the mesh, then the field's materials written into texels.

Every texel whose centre falls inside a UV triangle is lifted to its 3D point on that triangle,
pulled onto the field's zero level along the normal, and the field is queried there. Empty texels
are then filled outward from the charts (a few rings of neighbour averages, then push-pull for the
rest), so bilinear filtering and mipmaps across chart borders never fetch unrelated colours.

Texture images are [H, W, C] with row 0 at the top of the image, which is glTF's v = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
import xatlas

from .field import SurfaceField
from .mesh import QUERY_CHUNK, Mesh, field_device, query_sdf, sdf_gradient
from .progress import Progress, no_progress

CANDIDATES_PER_CHUNK = 1 << 22  # texel candidates tested at once while rasterising


@dataclass
class Textures:
    """Baked material maps, linear values in [0, 1] (normal: unit tangent-space vectors)."""

    base_colour: torch.Tensor  # [H, W, 3] linear albedo
    roughness: torch.Tensor  # [H, W]
    metallic: torch.Tensor  # [H, W]
    normal: torch.Tensor | None = None  # [H, W, 3] tangent space (x right along u, y up, z out)
    coverage: torch.Tensor | None = None  # [H, W] bool: texels that lie inside a UV triangle

    @property
    def size(self) -> int:
        return self.base_colour.shape[0]


@dataclass(frozen=True)
class AtlasConfig:
    """How the UV atlas is cut and packed (see `uv_atlas` for why pieces exist)."""

    padding: int = 4  # texels between charts, room for the dilation in `bake`
    piece_faces: int = 2000  # most faces xatlas segments at once; its chart growing is quadratic in chart size


def spatial_pieces(vertices: np.ndarray, faces: np.ndarray, piece_faces: int) -> list[np.ndarray]:
    """Face indices split into compact pieces of at most piece_faces faces.

    Recursive median cuts of the face centroids across the longest extent, so every piece is a
    roughly cubic patch of surface holding at least half of piece_faces, rounded down.
    """
    centroids = vertices[faces].mean(axis=1)
    pieces, pending = [], [np.arange(len(faces))]
    while pending:
        ids = pending.pop()
        if len(ids) <= piece_faces:
            pieces.append(ids)
            continue
        points = centroids[ids]
        axis = int(np.argmax(points.max(axis=0) - points.min(axis=0)))
        order = ids[np.argsort(points[:, axis], kind="stable")]
        pending += [order[: len(order) // 2], order[len(order) // 2 :]]
    return pieces


def uv_atlas(mesh: Mesh, texture_size: int, config: AtlasConfig = AtlasConfig()) -> Mesh:
    """The mesh split along chart seams with xatlas texture coordinates (glTF convention, in [0, 1]).

    xatlas grows each chart face by face and re-projects and re-checks the whole chart at every step,
    so its time grows with the square of the faces per chart; on a dense smooth surface charts hold
    thousands of faces (100k faces: about a minute). The mesh is therefore cut into compact pieces of
    at most `config.piece_faces` faces, each segmented as its own xatlas mesh (in parallel, on
    xatlas' threads) and all packed into one atlas: a few seconds, with the same texel density.
    The pieces' borders become chart seams, which the dilation in `bake` already handles.
    """
    vertices = mesh.vertices.astype(np.float64)
    edges = vertices[mesh.faces] - vertices[np.roll(mesh.faces, 1, axis=1)]
    # xatlas' tolerances are absolute (vertices within 1e-4 are welded, UV triangles under FLT_EPSILON
    # count as degenerate and send their chart to a slow fallback), so hand it unit-length edges.
    unit = vertices / max(float(np.linalg.norm(edges, axis=-1).mean()), 1e-12)
    atlas = xatlas.Atlas()
    pieces = spatial_pieces(unit, mesh.faces, config.piece_faces)
    used_vertices = []
    for ids in pieces:
        used, local = np.unique(mesh.faces[ids], return_inverse=True)
        atlas.add_mesh(unit[used].astype(np.float32), local.reshape(-1, 3).astype(np.uint32))
        used_vertices.append(used)
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    # xatlas may pack into a somewhat larger grid than asked (its texel density is an estimate);
    # uvs are normalised, so the padding between charts only shrinks a little.
    pack.padding = config.padding
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    old_index, faces, uvs, count = [], [], [], 0
    for used, piece in zip(used_vertices, range(atlas.mesh_count), strict=True):
        piece_index, piece_faces, piece_uvs = atlas[piece]
        old_index.append(used[piece_index])
        faces.append(piece_faces.astype(np.int64) + count)
        uvs.append(piece_uvs)
        count += len(piece_index)
    old_index = np.concatenate(old_index)
    normals = None if mesh.normals is None else mesh.normals[old_index]
    return Mesh(mesh.vertices[old_index], np.concatenate(faces), normals, np.concatenate(uvs).astype(np.float32))


def rasterise_uvs(uvs: torch.Tensor, faces: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which face covers each texel centre of a size x size image, and where.

    Returns face index [H, W] (-1 for empty texels) and barycentric coordinates [H, W, 3].
    """
    device = uvs.device
    corners = (uvs * size)[faces]  # [F, 3, 2] in texel units; texel centres sit at +0.5
    low = (corners.amin(dim=1) - 0.5).ceil().clamp(0, size - 1).long()
    high = (corners.amax(dim=1) - 0.5).floor().clamp(0, size - 1).long()
    extent = (high - low + 1).clamp_min(0)  # [F, 2] texel columns and rows in each bounding box
    counts = extent[:, 0] * extent[:, 1]

    face_of = torch.full((size * size,), -1, dtype=torch.long, device=device)
    barycentric = torch.zeros(size * size, 3, device=device)
    # Faces in chunks so no more than CANDIDATES_PER_CHUNK texel candidates exist at once.
    chunk_of = torch.cumsum(counts, 0).div(CANDIDATES_PER_CHUNK, rounding_mode="floor")
    for chunk in torch.unique(chunk_of):
        ids = torch.nonzero(chunk_of == chunk).squeeze(1)
        face = ids.repeat_interleave(counts[ids])
        first = torch.cumsum(counts[ids], 0) - counts[ids]  # start of each face's run of candidates
        local = torch.arange(len(face), device=device) - first.repeat_interleave(counts[ids])
        width = extent[face, 0]
        x = low[face, 0] + local % width
        y = low[face, 1] + local // width
        point = torch.stack([x, y], dim=-1).float() + 0.5
        a, b, c = corners[face].unbind(1)
        area = _cross_2d(b - a, c - a)
        safe = torch.where(area.abs() > 1e-12, area, torch.ones_like(area))
        # point = a + s (b - a) + t (c - a), solved with 2D cross products.
        s, t = _cross_2d(point - a, c - a) / safe, _cross_2d(b - a, point - a) / safe
        weights = torch.stack([1.0 - s - t, s, t], dim=-1)
        inside = (weights >= -1e-6).all(dim=-1) & (area.abs() > 1e-12)
        texel = (y * size + x)[inside]
        face_of[texel] = face[inside]
        barycentric[texel] = weights[inside]
    return face_of.reshape(size, size), barycentric.reshape(size, size, 3)


def _cross_2d(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]


def _tangent_frames(mesh: Mesh, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-face tangent (direction of increasing u) and bitangent (direction of decreasing glTF v).

    glTF normal maps have +Y up in the image, and image rows grow with v, so "up" is -dP/dv.
    """
    positions = torch.as_tensor(mesh.vertices, device=device)[torch.as_tensor(mesh.faces, device=device)]
    uv = torch.as_tensor(mesh.uvs, device=device)[torch.as_tensor(mesh.faces, device=device)]
    e1, e2 = positions[:, 1] - positions[:, 0], positions[:, 2] - positions[:, 0]
    d1, d2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    det = torch.where(det.abs() > 1e-20, det, torch.full_like(det, 1e-20))[:, None]
    tangent = (e1 * d2[:, 1:] - e2 * d1[:, 1:]) / det
    dp_dv = (e2 * d1[:, :1] - e1 * d2[:, :1]) / det
    return tangent, -dp_dv


def _encode_tangent_space(
    true_normal: torch.Tensor, normal: torch.Tensor, tangent: torch.Tensor, bitangent: torch.Tensor
) -> torch.Tensor:
    """Express true normals in the (T, B, N) frame of each texel (Gram-Schmidt on T, B by handedness)."""
    tangent = F.normalize(tangent - normal * (normal * tangent).sum(-1, keepdim=True), dim=-1)
    handedness = torch.sign((torch.linalg.cross(normal, tangent, dim=-1) * bitangent).sum(-1, keepdim=True))
    bitangent = torch.where(handedness == 0, 1.0, handedness) * torch.linalg.cross(normal, tangent, dim=-1)
    local = torch.stack([(true_normal * axis).sum(-1) for axis in (tangent, bitangent, normal)], dim=-1)
    return F.normalize(local, dim=-1)


def snap_to_surface(
    field: SurfaceField, points: torch.Tensor, normals: torch.Tensor, max_step: float, iterations: int = 2
) -> torch.Tensor:
    """Move points along their normals onto the SDF zero level (clamped steps, so bad SDFs cannot fling)."""
    for _ in range(iterations):
        step = query_sdf(field, points).clamp(-max_step, max_step)
        points = points - step[:, None] * normals
    return points


def bake(
    field: SurfaceField,
    mesh: Mesh,
    texture_size: int,
    *,
    normal_map: bool = False,
    snap_distance: float = 0.02,
    dilation_rings: int = 4,
    progress: Progress = no_progress,
) -> Textures:
    """Bake albedo, roughness, metallic (and optionally a tangent-space normal map) for a UV-mapped mesh.

    mesh: canonical coordinates with uvs and unit vertex normals. snap_distance (canonical units)
    bounds how far a texel's point may move onto the zero level; 0 disables snapping.
    """
    if mesh.uvs is None or mesh.normals is None:
        raise ValueError("bake needs a mesh with uvs and vertex normals")
    device = field_device(field)
    faces = torch.as_tensor(mesh.faces, device=device)
    face_of, barycentric = rasterise_uvs(torch.as_tensor(mesh.uvs, device=device), faces, texture_size)
    covered = face_of >= 0
    face, weights = face_of[covered], barycentric[covered][..., None]  # [T], [T, 3, 1]
    corners = faces[face]
    points = (torch.as_tensor(mesh.vertices, device=device)[corners] * weights).sum(1)
    normals = F.normalize((torch.as_tensor(mesh.normals, device=device)[corners] * weights).sum(1), dim=-1)
    progress("bake", 0.1)

    if snap_distance > 0:
        points = snap_to_surface(field, points, normals, snap_distance)
    albedo, roughness, metallic, true_normals = [], [], [], []
    step = 1e-3
    chunks = points.split(QUERY_CHUNK)
    for i, chunk in enumerate(chunks):
        with torch.no_grad():
            sample = field(chunk)
        albedo.append(sample.albedo.float())
        roughness.append(sample.roughness.float())
        metallic.append(sample.metallic.float())
        if normal_map:
            true_normals.append(F.normalize(sdf_gradient(field, chunk, step), dim=-1))
        progress("bake", 0.1 + 0.8 * (i + 1) / len(chunks))

    def image(values: torch.Tensor, channels: int) -> torch.Tensor:
        full = torch.zeros(texture_size, texture_size, channels, device=device)
        full[covered] = values.reshape(len(values), channels).clamp(0.0, 1.0)
        return fill_empty(full, covered, dilation_rings)

    textures = Textures(
        base_colour=image(torch.cat(albedo), 3),
        roughness=image(torch.cat(roughness), 1)[..., 0],
        metallic=image(torch.cat(metallic), 1)[..., 0],
        coverage=covered,
    )
    if normal_map:
        tangent, bitangent = (frame[face] for frame in _tangent_frames(mesh, device))
        local = _encode_tangent_space(torch.cat(true_normals), normals, tangent, bitangent)
        # Fill in the [0, 1] encoding, then decode, so empty texels average to valid directions.
        encoded = image(local * 0.5 + 0.5, 3)
        textures = replace(textures, normal=F.normalize(encoded * 2.0 - 1.0, dim=-1))
    progress("bake", 1.0)
    return textures


def fill_empty(image: torch.Tensor, filled: torch.Tensor, rings: int = 4) -> torch.Tensor:
    """Fill empty texels of image [H, W, C]: `rings` rings of neighbour averages, then push-pull.

    The rings keep values next to chart borders close to the chart's own; push-pull gives every
    remaining texel a smooth average of the nearest charts, so no texel stays black.
    """
    values = image.permute(2, 0, 1)[None]  # [1, C, H, W]
    mask = filled[None, None].to(values.dtype)
    kernel = torch.ones(1, 1, 3, 3, device=image.device, dtype=values.dtype)
    for _ in range(rings):
        total = F.conv2d(values * mask, kernel.expand(values.shape[1], 1, 3, 3), padding=1, groups=values.shape[1])
        count = F.conv2d(mask, kernel, padding=1)
        grow = (count > 0) & (mask == 0)
        values = torch.where(grow, total / count.clamp_min(1.0), values)
        mask = torch.where(grow, 1.0, mask)
    values = _push_pull(values, mask)
    return values[0].permute(1, 2, 0).contiguous()


def _push_pull(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill texels where mask == 0 from ever coarser averages of the filled ones."""
    if bool(mask.all()) or not bool(mask.any()) or min(values.shape[-2:]) < 2:
        return values
    total = F.avg_pool2d(values * mask, 2, ceil_mode=True)
    count = F.avg_pool2d(mask, 2, ceil_mode=True)
    coarse = _push_pull(total / count.clamp_min(1e-12), (count > 0).to(mask.dtype))
    upsampled = F.interpolate(coarse, scale_factor=2, mode="nearest")[..., : values.shape[-2], : values.shape[-1]]
    return torch.where(mask > 0, values, upsampled)

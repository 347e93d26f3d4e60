"""Where the SDF becomes a mesh: bounded-memory marching cubes, cleanup, simplification, normals.

The grid has `resolution` samples per axis spanning the canonical box [-1, 1]^3. It is cut into
cubic blocks of `block` cells that share their boundary sample planes. A coarse pass (every
`coarse_stride`-th sample) decides which blocks can hold surface; only those are sampled finely
and meshed, so a 512^3 grid costs memory and SDF queries in proportion to the surface, not the
volume. Neighbouring blocks compute identical vertices on their shared faces, so welding by exact
position stitches them into one mesh, the same mesh one unchunked marching cubes would give.

Meshes are numpy arrays: marching cubes, simplification, the UV atlas and the GLB writer are CPU
libraries. Field queries run in torch on the field's device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import fast_simplification
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import marching_cubes

from .errors import InputError
from .field import SurfaceField
from .progress import Progress, no_progress

QUERY_CHUNK = 1 << 20  # points per field call: bounds memory of one query on any device


@dataclass
class Mesh:
    """A triangle mesh; faces wind counter-clockwise seen from outside."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int64 vertex indices
    normals: np.ndarray | None = None  # [V, 3] float32 unit vertex normals
    uvs: np.ndarray | None = None  # [V, 2] float32 texture coordinates, glTF convention (v down)

    @property
    def face_count(self) -> int:
        return len(self.faces)

    def area(self) -> float:
        return float(face_areas(self.vertices, self.faces).sum())

    def bounds(self) -> np.ndarray:
        """Axis-aligned bounds [2, 3] (min, max)."""
        return np.stack([self.vertices.min(axis=0), self.vertices.max(axis=0)])


def field_device(field: SurfaceField) -> torch.device:
    """The device a field computes on (the protocol carries it through its `beta` tensor)."""
    return field.beta.device


def query_sdf(field: SurfaceField, points: torch.Tensor) -> torch.Tensor:
    """SDF at points [N, 3] in bounded chunks, without building an autograd graph."""
    with torch.no_grad():
        return torch.cat([field.sdf(chunk) for chunk in points.split(QUERY_CHUNK)]) if len(points) else points[:, 0]


# ---------------------------------------------------------------------------------------------
# Marching cubes


def grid_axis(resolution: int) -> np.ndarray:
    """Sample positions along one axis of the canonical box."""
    return np.linspace(-1.0, 1.0, resolution)


def _sample_lattice(field: SurfaceField, axes: list[np.ndarray]) -> np.ndarray:
    """SDF on the lattice axes[0] x axes[1] x axes[2] (positions), as a float32 array, sliced along x."""
    device = field_device(field)
    y, z = torch.meshgrid(torch.as_tensor(axes[1]), torch.as_tensor(axes[2]), indexing="ij")
    plane = torch.stack([y.reshape(-1), z.reshape(-1)], dim=-1).float().to(device)
    values = np.empty([len(a) for a in axes], dtype=np.float32)
    slab = max(1, QUERY_CHUNK // len(plane))
    for start in range(0, len(axes[0]), slab):
        xs = torch.as_tensor(axes[0][start : start + slab]).float().to(device)
        points = torch.cat([xs.repeat_interleave(len(plane))[:, None], plane.repeat(len(xs), 1)], dim=-1)
        values[start : start + len(xs)] = query_sdf(field, points).reshape(len(xs), *values.shape[1:]).cpu().numpy()
    return values


def _blocks(resolution: int, block: int) -> list[tuple[int, int]]:
    """Inclusive sample-index ranges [start, stop] of the blocks along one axis."""
    cells = resolution - 1
    return [(start, min(start + block, cells)) for start in range(0, cells, block)]


def _surface_blocks(
    field: SurfaceField, resolution: int, block: int, coarse_stride: int
) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Blocks (x0, x1, y0, y1, z0, z1), inclusive sample ranges, that may contain the zero level.

    A block is kept when its coarse samples change sign, or when one of them is closer to the
    surface than twice the distance from any fine sample to its nearest coarse sample (an SDF
    changes no faster than distance, and the factor two allows for fields that are not exact).
    """
    ranges = _blocks(resolution, block)
    if len(ranges) == 1:  # one block: nothing to skip, no coarse pass needed
        yield (*ranges[0], *ranges[0], *ranges[0])
        return
    coarse_index = np.unique(np.append(np.arange(0, resolution, coarse_stride), resolution - 1))
    axis = grid_axis(resolution)
    coarse = _sample_lattice(field, [axis[coarse_index]] * 3)
    spacing = 2.0 / (resolution - 1)
    margin = math.sqrt(3.0) * coarse_stride * spacing
    within = [np.searchsorted(coarse_index, [a, b + 1]) for a, b in ranges]  # coarse samples per block
    for i, (x0, x1) in enumerate(ranges):
        for j, (y0, y1) in enumerate(ranges):
            for k, (z0, z1) in enumerate(ranges):
                values = coarse[slice(*within[i]), slice(*within[j]), slice(*within[k])]
                if values.min() <= 0.0 <= values.max() or np.abs(values).min() <= margin:
                    yield x0, x1, y0, y1, z0, z1


def extract_surface(
    field: SurfaceField,
    resolution: int = 256,
    *,
    block: int = 32,
    coarse_stride: int = 4,
    progress: Progress = no_progress,
) -> Mesh:
    """Marching cubes of the field's zero level on a resolution^3 grid over [-1, 1]^3.

    Memory is bounded by one batch of blocks, whatever the resolution. Returns vertices in
    canonical coordinates, welded across blocks; an empty mesh when the SDF never changes sign.
    """
    if block % coarse_stride:
        raise ValueError(f"block ({block}) must be a multiple of coarse_stride ({coarse_stride})")
    axis = grid_axis(resolution)
    spacing = 2.0 / (resolution - 1)
    candidates = list(_surface_blocks(field, resolution, block, coarse_stride))
    vertex_parts, face_parts, count = [], [], 0
    for done, (x0, x1, y0, y1, z0, z1) in enumerate(candidates, start=1):
        values = _sample_lattice(field, [axis[x0 : x1 + 1], axis[y0 : y1 + 1], axis[z0 : z1 + 1]])
        if values.min() <= 0.0 <= values.max():
            vertices, faces, _, _ = marching_cubes(values, level=0.0)
            # Integer sample offsets keep shared-face vertices bit-identical between neighbouring blocks.
            vertex_parts.append(vertices.astype(np.float64) + np.array([x0, y0, z0], dtype=np.float64))
            face_parts.append(faces.astype(np.int64) + count)
            count += len(vertices)
        progress("marching cubes", done / len(candidates))
    if not vertex_parts:
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    vertices, inverse = np.unique(np.concatenate(vertex_parts), axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[np.concatenate(face_parts)]
    return Mesh((vertices * spacing - 1.0).astype(np.float32), faces)


# ---------------------------------------------------------------------------------------------
# Cleanup and simplification


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[faces[:, i]].astype(np.float64) for i in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def sample_triangles(triangles: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted random points on triangles [T, 3, 3] and their unit face normals, [count, 3] each.

    Normals follow each triangle's winding (outward for a well-made mesh).
    """
    edges_a, edges_b = triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]
    cross = np.cross(edges_a, edges_b)
    areas = 0.5 * np.linalg.norm(cross, axis=1)
    if not areas.sum() > 0.0:
        raise InputError("the mesh has no surface area to sample; give a mesh with non-degenerate faces")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(triangles), size=count, p=areas / areas.sum())
    # Uniform barycentric coordinates: fold the unit square onto the triangle.
    u, v = rng.random(count), rng.random(count)
    folded = u + v > 1.0
    u[folded], v[folded] = 1.0 - u[folded], 1.0 - v[folded]
    points = triangles[chosen, 0] + u[:, None] * edges_a[chosen] + v[:, None] * edges_b[chosen]
    normals = cross[chosen] / np.maximum(2.0 * areas[chosen, None], 1e-30)
    return points.astype(np.float32), normals.astype(np.float32)


def sample_points(mesh: Mesh, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted random points on a mesh and their face normals, [count, 3] each."""
    return sample_triangles(mesh.vertices[mesh.faces].astype(np.float64), count, seed)


def _keep_faces(mesh: Mesh, keep: np.ndarray) -> Mesh:
    """The mesh restricted to faces where `keep`, with unreferenced vertices dropped."""
    used, faces = np.unique(mesh.faces[keep], return_inverse=True)
    normals = None if mesh.normals is None else mesh.normals[used]
    uvs = None if mesh.uvs is None else mesh.uvs[used]
    return Mesh(mesh.vertices[used], faces.reshape(-1, 3), normals, uvs)


def component_labels(faces: np.ndarray, vertex_count: int) -> np.ndarray:
    """Connected-component label of every face (faces connect through shared vertices)."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])  # enough edges to connect each face's corners
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(vertex_count, vertex_count))
    _, vertex_labels = connected_components(graph, directed=False)
    return vertex_labels[faces[:, 0]]


def clean(mesh: Mesh, min_component_fraction: float = 0.01) -> Mesh:
    """Drop degenerate faces and floating components smaller than a fraction of all faces."""
    faces = mesh.faces
    distinct = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    mesh = _keep_faces(mesh, distinct & (face_areas(mesh.vertices, faces) > 1e-14))
    if mesh.face_count == 0:
        return mesh
    labels = component_labels(mesh.faces, len(mesh.vertices))
    sizes = np.bincount(labels)
    return _keep_faces(mesh, sizes[labels] >= min_component_fraction * mesh.face_count)


def simplify(mesh: Mesh, target_faces: int) -> Mesh:
    """Quadric decimation to about target_faces faces; meshes already that small are returned as is."""
    if target_faces <= 0 or mesh.face_count <= target_faces:
        return mesh
    vertices, faces = fast_simplification.simplify(
        mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32), target_count=target_faces
    )
    return Mesh(np.asarray(vertices, np.float32), np.asarray(faces, np.int64))


# ---------------------------------------------------------------------------------------------
# Normals


def mesh_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals from the faces' winding."""
    a, b, c = (vertices[faces[:, i]].astype(np.float64) for i in range(3))
    face_normals = np.cross(b - a, c - a)  # length = twice the area: the weighting comes free
    normals = np.zeros((len(vertices), 3))
    for i in range(3):
        np.add.at(normals, faces[:, i], face_normals)
    return _normalised(normals).astype(np.float32)


def sdf_gradient(field: SurfaceField, points: torch.Tensor, step: float) -> torch.Tensor:
    """Central-difference SDF gradient [N, 3] at points [N, 3] (works for fields without autograd)."""
    offsets = torch.eye(3, device=points.device, dtype=points.dtype) * step
    shifted = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1)  # [N, 6, 3]
    values = query_sdf(field, shifted.reshape(-1, 3)).reshape(-1, 2, 3)
    return (values[:, 0] - values[:, 1]) / (2.0 * step)


def with_normals(mesh: Mesh, field: SurfaceField | None = None, step: float = 1e-3) -> Mesh:
    """The mesh with unit vertex normals: the SDF gradient where it is usable, else the mesh's own."""
    fallback = mesh_normals(mesh.vertices, mesh.faces)
    if field is None:
        return replace(mesh, normals=fallback)
    points = torch.as_tensor(mesh.vertices, device=field_device(field))
    gradient = np.concatenate([sdf_gradient(field, c, step).cpu().numpy() for c in points.split(QUERY_CHUNK // 6)])
    length = np.linalg.norm(gradient, axis=1, keepdims=True)
    # A vanishing or backward gradient (creases, medial points) would give a wrong shading normal.
    usable = (length[:, 0] > 1e-6) & (np.sum(gradient * fallback, axis=1) > 0.0)
    normals = np.where(usable[:, None], gradient / np.maximum(length, 1e-12), fallback)
    return replace(mesh, normals=_normalised(normals).astype(np.float32))


def _normalised(vectors: np.ndarray) -> np.ndarray:
    length = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero vector (isolated vertex) gets an arbitrary unit normal, so every normal is valid glTF.
    return np.where(length > 1e-20, vectors / np.maximum(length, 1e-20), np.array([0.0, 0.0, 1.0]))

"""Marching cubes, cleanup, simplification and normals on analytic SDF fields.

`AnalyticField` here is also the test field of tests/test_export.py and tests/test_blender_import.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.field import FieldSample
from backend.mesh import Mesh, _surface_blocks, clean, component_labels, extract_surface, simplify, with_normals


class AnalyticField:
    """A union of spheres and rounded boxes with a checker albedo and smoothly varying roughness/metallic.

    diffuse=True makes it a rough dielectric (metallic 0, roughness 1) with the same albedo.
    """

    def __init__(self, spheres=((0.0, 0.0, 0.0, 0.6),), boxes=(), beta: float = 0.01, diffuse: bool = False) -> None:
        self.diffuse = diffuse
        self.spheres = torch.tensor(spheres, dtype=torch.float32).reshape(-1, 4)  # centre xyz, radius
        self.boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 7)  # centre xyz, half extents, rounding
        self._beta = torch.tensor(beta)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        distances = [(points - s[:3]).norm(dim=-1) - s[3] for s in self.spheres]
        for b in self.boxes:
            q = (points - b[:3]).abs() - (b[3:6] - b[6])
            distances.append(q.clamp_min(0.0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0.0) - b[6])
        return torch.stack(distances).amin(dim=0)

    def __call__(self, points: torch.Tensor) -> FieldSample:
        checker = (points * 4.0).floor().sum(dim=-1).remainder(2.0)  # 0/1 cubes of side 0.25
        albedo = torch.stack([0.1 + 0.8 * checker, 0.3 + 0.4 * (points[:, 2] + 1) / 2, 0.9 - 0.8 * checker], dim=-1)
        roughness = (0.2 + 0.6 * (points[:, 2] + 1.0) / 2.0).clamp(0.0, 1.0)
        metallic = (0.5 + 0.5 * points[:, 0]).clamp(0.0, 1.0)
        if self.diffuse:
            roughness, metallic = torch.ones_like(roughness), torch.zeros_like(metallic)
        return FieldSample(self.sdf(points), albedo, roughness, metallic)

    @property
    def beta(self) -> torch.Tensor:
        return self._beta


def edge_use_counts(faces: np.ndarray) -> np.ndarray:
    """How many faces use each undirected edge."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return counts


def is_watertight(mesh: Mesh) -> bool:
    return bool((edge_use_counts(mesh.faces) == 2).all())


def test_sphere_mesh_has_the_right_radius_area_normals_and_is_watertight():
    radius = 0.6
    field = AnalyticField(spheres=[(0.0, 0.0, 0.0, radius)])
    mesh = with_normals(clean(extract_surface(field, 96)), field)

    distance = np.linalg.norm(mesh.vertices, axis=1)
    spacing = 2.0 / 95
    assert np.abs(distance - radius).max() < 0.05 * spacing  # linear interpolation of an exact SDF
    assert mesh.area() == pytest.approx(4.0 * np.pi * radius**2, rel=0.005)
    assert is_watertight(mesh)
    assert len(mesh.vertices) - len(edge_use_counts(mesh.faces)) + mesh.face_count == 2  # Euler: a sphere
    radial = mesh.vertices / distance[:, None]
    assert np.einsum("ij,ij->i", mesh.normals, radial).min() > 0.999
    # Faces wind counter-clockwise seen from outside (glTF's front faces).
    a, b, c = (mesh.vertices[mesh.faces[:, i]] for i in range(3))
    assert (np.einsum("ij,ij->i", np.cross(b - a, c - a), a + b + c) > 0).all()


def test_chunked_marching_cubes_equals_unchunked():
    field = AnalyticField(spheres=[(0.2, -0.1, 0.05, 0.45)], boxes=[(-0.3, 0.25, -0.2, 0.35, 0.2, 0.5, 0.05)])
    chunked = extract_surface(field, 72, block=8)
    whole = extract_surface(field, 72, block=1000)
    assert chunked.face_count == whole.face_count > 1000
    np.testing.assert_allclose(np.sort(chunked.vertices, axis=0), np.sort(whole.vertices, axis=0), atol=1e-6)
    assert chunked.area() == pytest.approx(whole.area(), rel=1e-6)
    assert is_watertight(clean(chunked))


def test_coarse_pass_skips_blocks_far_from_the_surface():
    field = AnalyticField(spheres=[(0.0, 0.0, 0.0, 0.3)])
    kept = list(_surface_blocks(field, 129, block=16, coarse_stride=4))
    assert 0 < len(kept) < 0.5 * 8**3
    # Every block that the surface passes through is among them (nothing was lost).
    assert is_watertight(extract_surface(field, 129, block=16))


def test_cleanup_drops_floaters_and_keeps_the_main_body():
    field = AnalyticField(spheres=[(0.0, 0.0, 0.0, 0.6), (0.8, 0.8, 0.8, 0.04)])
    raw = extract_surface(field, 96)
    assert len(np.unique(component_labels(raw.faces, len(raw.vertices)))) == 2
    cleaned = clean(raw)
    assert len(np.unique(component_labels(cleaned.faces, len(cleaned.vertices)))) == 1
    assert np.linalg.norm(cleaned.vertices, axis=1).max() < 0.61
    assert cleaned.area() == pytest.approx(4.0 * np.pi * 0.36, rel=0.005)


def test_cleanup_removes_degenerate_faces_and_unused_vertices():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 2, 2], [0, 0, 1]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [0, 0, 1], [0, 1, 1], [0, 2, 4], [1, 2, 4], [0, 1, 4]])
    cleaned = clean(Mesh(vertices, faces), min_component_fraction=0.0)
    assert cleaned.face_count == 4
    assert len(cleaned.vertices) == 4  # the unreferenced vertex (2, 2, 2) is gone
    assert not (cleaned.vertices == 2.0).all(axis=1).any()


def test_simplification_hits_the_target_face_count():
    field = AnalyticField(spheres=[(0.2, -0.1, 0.05, 0.45)], boxes=[(-0.3, 0.25, -0.2, 0.35, 0.2, 0.5, 0.05)])
    mesh = clean(extract_surface(field, 96))
    assert mesh.face_count > 20_000
    simplified = simplify(mesh, 2_000)
    assert simplified.face_count == pytest.approx(2_000, rel=0.05)
    assert simplified.area() == pytest.approx(mesh.area(), rel=0.02)
    assert simplify(mesh, 0) is mesh and simplify(mesh, 10**7) is mesh


def test_a_field_without_surface_gives_an_empty_mesh():
    field = AnalyticField(spheres=[(5.0, 5.0, 5.0, 0.5)])
    assert extract_surface(field, 64).face_count == 0

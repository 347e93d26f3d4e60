"""Camera conventions, rays, projection, Plücker coordinates, the canonical box and the visual hull."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.cameras import (
    Cameras,
    Normalisation,
    image_rays,
    occupied_bounds,
    opengl_to_opencv,
    pixel_rays,
    plucker,
    project,
    viewed_region,
    visual_hull,
)

finite = st.floats(-5.0, 5.0, allow_nan=False)
# No deadline: this machine is shared, and timing is not what these tests check.
relaxed = settings(deadline=None, max_examples=40)
quaternions = st.tuples(*[st.floats(-1.0, 1.0)] * 4).filter(lambda q: sum(c * c for c in q) > 0.05)


def rotation_from_quaternion(q) -> torch.Tensor:
    w, x, y, z = (torch.tensor(q, dtype=torch.float64) / math.sqrt(sum(c * c for c in q))).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )


@st.composite
def cameras_strategy(draw, max_views: int = 3) -> Cameras:
    """Random rigid float64 cameras with plausible pinhole intrinsics."""
    views = draw(st.integers(1, max_views))
    width, height = draw(st.integers(8, 512)), draw(st.integers(8, 512))
    c2w = torch.eye(4, dtype=torch.float64).repeat(views, 1, 1)
    intrinsics = []
    for view in range(views):
        c2w[view, :3, :3] = rotation_from_quaternion(draw(quaternions))
        c2w[view, :3, 3] = torch.tensor(draw(st.tuples(finite, finite, finite)), dtype=torch.float64)
        focal = draw(st.floats(20.0, 800.0))
        intrinsics.append(
            [
                focal,
                focal * draw(st.floats(0.7, 1.4)),
                draw(st.floats(0.0, float(width))),
                draw(st.floats(0.0, float(height))),
            ]
        )
    return Cameras(c2w, torch.tensor(intrinsics, dtype=torch.float64), width, height)


def look_at(eye, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """OpenCV camera-to-world [4, 4] at eye looking at target, world Z up."""
    eye, target = torch.tensor(eye, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    forward = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def orbit_cameras(views: int = 8, size: int = 48, radius: float = 3.0, focal: float = 60.0) -> Cameras:
    """Cameras on a wavy ring around the origin, all looking at it."""
    angles = [2 * math.pi * view / views for view in range(views)]
    eyes = [(radius * math.cos(a), radius * math.sin(a), 1.0 + 0.5 * math.sin(3 * a)) for a in angles]
    intrinsics = torch.tensor([[focal, focal, size / 2, size / 2]] * views)
    return Cameras(torch.stack([look_at(eye) for eye in eyes]), intrinsics, size, size)


def sphere_masks(cameras: Cameras, centre, radius: float) -> torch.Tensor:
    """Exact silhouettes [V, H, W] of a sphere, sampled at pixel centres."""
    origins, directions = image_rays(cameras)
    offset = origins - torch.tensor(centre)
    along = (offset * directions).sum(-1)
    discriminant = along**2 - (offset * offset).sum(-1) + radius**2
    return ((discriminant > 0) & (along < 0)).float()


@relaxed
@given(cameras_strategy())
def test_opengl_to_opencv_is_its_own_inverse(cameras):
    assert torch.equal(opengl_to_opencv(opengl_to_opencv(cameras.c2w)), cameras.c2w)


def test_opengl_camera_looks_down_minus_z_and_opencv_down_plus_z():
    camera = Cameras(opengl_to_opencv(torch.eye(4)[None]), torch.tensor([[10.0, 10.0, 8.0, 6.0]]), 16, 12)
    ahead, up, right = torch.tensor([[0.0, 0.0, -2.0], [0.0, 1.0, -2.0], [1.0, 0.0, -2.0]]).unbind(0)
    uv, depth = project(camera, torch.stack([ahead, up, right]))
    assert depth[0].tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert uv[0, 0].tolist() == pytest.approx([8.0, 6.0])
    assert uv[0, 1].tolist() == pytest.approx([8.0, 1.0])  # Blender's up is up in the image (smaller row)
    assert uv[0, 2].tolist() == pytest.approx([13.0, 6.0])


@relaxed
@given(cameras_strategy(), st.data())
def test_project_inverts_pixel_rays(cameras, data):
    count = 5
    pixels = torch.tensor(
        [
            [
                [data.draw(st.floats(0.0, cameras.width)), data.draw(st.floats(0.0, cameras.height))]
                for _ in range(count)
            ]
            for _ in range(len(cameras))
        ],
        dtype=torch.float64,
    )
    distances = torch.tensor(data.draw(st.lists(st.floats(0.1, 20.0), min_size=count, max_size=count)))
    origins, directions = pixel_rays(cameras, pixels)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(1, dtype=torch.float64))
    for view in range(len(cameras)):
        points = origins[view] + directions[view] * distances[:, None].double()
        uv, depth = project(cameras[view], points)
        assert torch.allclose(uv[0], pixels[view], atol=1e-6)
        assert (depth > 0).all()


@relaxed
@given(cameras_strategy())
def test_world_to_camera_inverts_camera_to_world(cameras):
    eye = torch.eye(4, dtype=torch.float64).expand(len(cameras), 4, 4)
    assert torch.allclose(cameras.world_to_camera() @ cameras.c2w, eye, atol=1e-9)


@relaxed
@given(cameras_strategy(max_views=1), st.floats(-10.0, 10.0), st.floats(0.1, 10.0))
def test_plucker_is_invariant_to_sliding_the_origin_along_the_ray(cameras, slide, stretch):
    origins, directions = image_rays(cameras.resized(16, 12))
    moved = plucker(origins + slide * directions, stretch * directions)
    assert torch.allclose(moved, plucker(origins, directions), atol=1e-9)


@relaxed
@given(cameras_strategy(), st.integers(8, 512), st.integers(8, 512), st.data())
def test_resized_cameras_project_consistently(cameras, width, height, data):
    points = torch.tensor(data.draw(st.lists(st.tuples(finite, finite, finite), min_size=1, max_size=6)))
    uv, depth = project(cameras, points)
    uv_resized, depth_resized = project(cameras.resized(width, height), points)
    scale = torch.tensor([width / cameras.width, height / cameras.height], dtype=torch.float64)
    in_front = depth > 1e-3
    assert torch.allclose(uv_resized[in_front], (uv * scale)[in_front], rtol=1e-9, atol=1e-6)
    assert torch.equal(depth, depth_resized)


aabbs = st.tuples(st.tuples(finite, finite, finite), st.tuples(*[st.floats(0.05, 10.0)] * 3)).map(
    lambda corner_size: torch.tensor([corner_size[0], [c + s for c, s in zip(*corner_size, strict=True)]])
)


@relaxed
@given(aabbs, st.floats(0.0, 0.5), st.lists(st.tuples(finite, finite, finite), min_size=1, max_size=8))
def test_normalisation_round_trips_and_fits_the_box(aabb, margin, points):
    normalisation = Normalisation.from_aabb(aabb, margin)
    points = torch.tensor(points, dtype=torch.float64)
    assert torch.allclose(normalisation.to_world(normalisation.to_canonical(points)), points, atol=1e-5)
    corners = normalisation.to_canonical(aabb.double())
    assert corners.abs().max() == pytest.approx(1.0 - margin, abs=1e-5)
    both = normalisation.canonical_to_world_matrix() @ normalisation.world_to_canonical_matrix()
    assert torch.allclose(both, torch.eye(4), atol=1e-5)
    homogeneous = torch.cat([points, torch.ones(len(points), 1, dtype=torch.float64)], dim=1)
    by_matrix = homogeneous @ normalisation.world_to_canonical_matrix().double().T
    assert torch.allclose(by_matrix[:, :3], normalisation.to_canonical(points), atol=1e-5)


@relaxed
@given(cameras_strategy(), aabbs, st.lists(st.tuples(finite, finite, finite), min_size=1, max_size=6))
def test_canonical_cameras_see_canonical_points_at_the_same_pixels(cameras, aabb, points):
    normalisation = Normalisation.from_aabb(aabb)
    points = torch.tensor(points, dtype=torch.float64)
    uv, depth = project(cameras, points)
    canonical_cameras = normalisation.cameras_to_canonical(cameras)
    uv_canonical, depth_canonical = project(canonical_cameras, normalisation.to_canonical(points))
    in_front = depth > 1e-2
    assert torch.allclose(uv_canonical[in_front], uv[in_front], rtol=1e-5, atol=1e-3)
    assert torch.allclose(depth_canonical, depth * normalisation.scale, rtol=1e-5, atol=1e-5)
    back = normalisation.cameras_to_world(canonical_cameras)
    assert torch.allclose(back.c2w, cameras.c2w, atol=1e-5)


def test_viewed_region_holds_what_an_orbit_looks_at():
    cameras = orbit_cameras()
    region = viewed_region(cameras)
    assert (region[0] < 0).all() and (region[1] > 0).all()
    parallel = Cameras(
        torch.stack([look_at((x, -3.0, 0.0), (x, 0.0, 0.0)) for x in range(3)]), cameras.intrinsics[:3], 48, 48
    )
    with pytest.raises(ValueError, match="do not converge"):
        viewed_region(parallel)


def test_visual_hull_contains_the_sphere_and_little_else():
    centre, radius, resolution = (0.2, -0.1, 0.15), 0.5, 32
    cameras = orbit_cameras(views=12)
    bounds = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    occupancy = visual_hull(cameras, sphere_masks(cameras, centre, radius), bounds, resolution)
    steps = (torch.arange(resolution) + 0.5) / resolution * 2 - 1
    grid = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), dim=-1)
    distance = (grid - torch.tensor(centre)).norm(dim=-1)
    voxel = 2.0 / resolution
    assert occupancy[distance < radius - voxel].all(), "the hull must contain the object"
    assert not occupancy[distance > 2 * radius].any(), "the hull must carve away what the views see as empty"
    box = occupied_bounds(occupancy, bounds, padding=1)
    sphere_box = torch.tensor([[c - radius for c in centre], [c + radius for c in centre]])
    assert (box[0] <= sphere_box[0]).all() and (box[1] >= sphere_box[1]).all()
    assert ((box - sphere_box).abs() < 0.35).all()


def test_visual_hull_without_enough_views_is_empty():
    cameras = orbit_cameras(views=4)
    masks = torch.ones(4, cameras.height, cameras.width)
    far_away = torch.tensor([[50.0, 50.0, 50.0], [51.0, 51.0, 51.0]])
    assert not visual_hull(cameras, masks, far_away, 8).any()
    with pytest.raises(ValueError, match="no voxel"):
        occupied_bounds(torch.zeros(4, 4, 4, dtype=torch.bool), far_away)

"""Proof against Blender itself: our projection lands on markers that Cycles renders.

Small glowing spheres are rendered through cameras with different lenses, sensor fits, shifts,
pixel aspects and non-square resolutions; the bundle is exported with blender_addon.capture
exactly as the add-on does, loaded with load_bundle, and each marker's projected centre is
compared with the centroid of its rendered blob.
"""

from typing import NamedTuple

import pytest
import torch

# Marker centres (world units, placed so that no two of a pass overlap in any view) and radius:
# small enough that the rendered blob's centroid and the projected centre agree to ~0.03 px.
MARKERS = [
    (0.3, -0.6, -0.7),
    (0.1, 0.7, -0.3),
    (0.4, 0.8, 0.6),
    (-0.5, -0.1, -0.3),
    (-0.7, 0.0, 0.7),
    (0.8, 0.1, 0.2),
]
RADIUS = 0.12
COLOURS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
# Two passes of three markers, one colour channel per marker within a pass.
PASSES = [(0, 1, 2), (3, 4, 5)]


class CameraSpec(NamedTuple):
    name: str
    location: tuple[float, float, float]
    lens: float  # mm
    sensor_fit: str
    sensor: tuple[float, float]  # width, height in mm
    shift: tuple[float, float]
    resolution: tuple[int, int]
    percentage: int
    pixel_aspect: tuple[float, float]  # x, y
    scale: float  # object scale, which the export must remove


CAMERAS = [
    CameraSpec("wide_auto", (4.0, -3.0, 1.8), 30.0, "AUTO", (36.0, 24.0), (0.1, -0.05), (96, 64), 100, (1, 1), 1.0),
    CameraSpec("tall_auto", (-3.0, -4.0, 1.0), 45.0, "AUTO", (36.0, 24.0), (0.0, 0.12), (64, 96), 100, (1, 1), 1.0),
    CameraSpec(
        "square_vert", (-4.0, 2.5, 2.2), 40.0, "VERTICAL", (36.0, 20.0), (-0.08, 0.05), (80, 80), 100, (1, 1), 1.7
    ),
    CameraSpec(
        "half_res_asp", (2.5, 4.0, -1.2), 35.0, "HORIZONTAL", (30.0, 24.0), (0.05, 0.1), (192, 128), 50, (1, 1.3), 1
    ),
]
BORDER_PX = 3.0  # markers this close to the frame edge are cut off and skipped


def _render_bundle(bpy, folder, spec: CameraSpec, markers):
    """Render both marker passes through one camera and export them as a bundle; returns its folder."""
    from blender_addon.capture import camera_frame, write_transforms
    from tests import blender_scene

    scene = blender_scene.use_cycles(*spec.resolution, samples=16)
    scene.render.resolution_percentage = spec.percentage
    scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = spec.pixel_aspect
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "8"
    camera = blender_scene.add_camera_looking_at(spec.name, spec.location, lens=spec.lens)
    camera.data.sensor_fit = spec.sensor_fit
    camera.data.sensor_width, camera.data.sensor_height = spec.sensor
    camera.data.shift_x, camera.data.shift_y = spec.shift
    camera.scale = (spec.scale,) * 3
    scene.camera = camera
    bpy.context.view_layer.update()

    bundle = folder / spec.name
    frames = []
    for index, members in enumerate(PASSES):
        for marker_index, marker in enumerate(markers):
            marker.hide_render = marker_index not in members
        file_path = f"images/pass{index}.png"
        scene.render.filepath = str(bundle / file_path)
        bpy.ops.render.render(write_still=True)
        frames.append({"file_path": file_path, **camera_frame(camera, scene)})
    write_transforms(bundle, frames)
    return bundle


def _marker_errors(bundle_path):
    """Pixel distance between projected and rendered centre of every cleanly visible marker."""
    from backend.bundle import load_bundle
    from backend.cameras import project

    bundle = load_bundle(bundle_path)
    uv, depth = project(bundle.cameras, torch.tensor(MARKERS))
    height, width = bundle.cameras.height, bundle.cameras.width
    rows, columns = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    errors = {}
    for view, members in enumerate(PASSES):
        for channel, marker in enumerate(members):
            u, v = uv[view, marker].tolist()
            inside = BORDER_PX < u < width - BORDER_PX and BORDER_PX < v < height - BORDER_PX
            # Another marker of the same pass close by in the image may occlude this one.
            crowded = any((uv[view, other] - uv[view, marker]).norm() < 8.0 for other in members if other != marker)
            if depth[view, marker] <= 0 or not inside or crowded:
                continue
            weight = bundle.masks[view] * bundle.images[view, ..., channel]
            assert weight.sum() > 1.0, f"marker {marker} projects to ({u:.1f}, {v:.1f}) but nothing was rendered there"
            centroid = torch.stack([(weight * columns).sum(), (weight * rows).sum()]) / weight.sum()
            errors[marker] = float((centroid - uv[view, marker]).norm())
    return errors


@pytest.mark.blender
def test_projection_lands_on_cycles_markers(bpy, tmp_path):
    from tests import blender_scene

    markers = [
        blender_scene.add_emissive_sphere(f"marker{index}", location, RADIUS, COLOURS[index % 3])
        for index, location in enumerate(MARKERS)
    ]
    worst = 0.0
    for spec in CAMERAS:
        errors = _marker_errors(_render_bundle(bpy, tmp_path, spec, markers))
        print(f"{spec.name}: " + ", ".join(f"marker {m} {e:.3f} px" for m, e in sorted(errors.items())))
        assert len(errors) >= 4, f"{spec.name} sees only {len(errors)} markers cleanly; the test lost its power"
        assert max(errors.values()) < 1.0, f"{spec.name}: projection misses the rendered markers: {errors}"
        worst = max(worst, *errors.values())
    print(f"max marker error over all cameras: {worst:.3f} px")


@pytest.mark.blender
def test_camera_frame_rejects_non_perspective_cameras(bpy):
    from blender_addon.capture import camera_frame
    from tests import blender_scene

    scene = blender_scene.use_cycles(32, 32)
    camera = blender_scene.add_camera_looking_at("orthographic", (0.0, -5.0, 0.0))
    camera.data.type = "ORTHO"
    with pytest.raises(ValueError, match="only perspective cameras"):
        camera_frame(camera, scene)


@pytest.mark.blender
def test_sphere_cameras_look_at_the_centre_from_the_requested_band(bpy):
    import math

    from mathutils import Vector

    from blender_addon.capture import sphere_cameras

    centre, radius, band = Vector((0.5, -1.0, 2.0)), 3.0, (-10.0, 60.0)
    cameras = sphere_cameras(centre, radius, 12, band, 35.0)
    turned = sphere_cameras(centre, radius, 12, band, 35.0, azimuth_offset=45.0, name="Turned")
    bpy.context.view_layer.update()
    assert len(cameras) == 12 and all(camera.data.lens == 35.0 for camera in cameras)
    for camera in cameras + turned:
        offset = camera.matrix_world.translation - centre
        assert math.isclose(offset.length, radius, rel_tol=1e-5)
        assert band[0] - 1e-3 <= math.degrees(math.asin(offset.z / radius)) <= band[1] + 1e-3
        forward = camera.matrix_world.to_3x3() @ Vector((0.0, 0.0, -1.0))  # cameras look down their -Z
        assert forward.dot(-offset.normalized()) > 1.0 - 1e-6
    assert min((a.location - b.location).length for a in cameras for b in turned) > 0.1 * radius

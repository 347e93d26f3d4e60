"""Export Blender cameras as bundle frames: the `transforms.json` the backend reads (DESIGN §3).

Runs inside Blender, so stdlib and bpy only. Intrinsics follow Blender's own definition of the
view plane (BKE_camera_params_compute_viewplane; Cycles' camera sync agrees):
- the sensor size is `sensor_height` for a VERTICAL fit and `sensor_width` otherwise (AUTO too);
- AUTO fits the sensor to the wider side of the image, measured with the pixel aspect;
- the fitted image side spans sensor / lens at unit depth, and lens shift moves the view plane by
  shift times that fitted side (both shifts use the fitted side, not their own axis).
The output resolution is resolution_x/y scaled by resolution_percentage (integer, as Blender does).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

TRANSFORMS = "transforms.json"
GOLDEN_ANGLE = 180.0 * (3.0 - math.sqrt(5.0))  # degrees; successive azimuths never line up


def render_size(scene) -> tuple[int, int]:
    """The pixel size of the scene's renders: resolution times percentage, truncated like Blender."""
    render = scene.render
    return (
        render.resolution_x * render.resolution_percentage // 100,
        render.resolution_y * render.resolution_percentage // 100,
    )


def camera_frame(camera_object, scene) -> dict:
    """One bundle frame for a camera object: OpenGL camera-to-world and pixel intrinsics.

    matrix_world is read as it is now; after moving cameras from Python, call
    `view_layer.update()` first. Object scale is removed, as the renderers do.
    """
    if camera_object.type != "CAMERA":
        raise ValueError(f"object '{camera_object.name}' is a {camera_object.type}, not a camera; select a camera.")
    camera = camera_object.data
    if camera.type != "PERSP":
        raise ValueError(
            f"camera '{camera_object.name}' is {camera.type}; only perspective cameras can be exported, "
            "so set its type to Perspective."
        )
    width, height = render_size(scene)
    aspect_x, aspect_y = scene.render.pixel_aspect_x, scene.render.pixel_aspect_y
    sensor = camera.sensor_height if camera.sensor_fit == "VERTICAL" else camera.sensor_width
    horizontal = camera.sensor_fit == "HORIZONTAL" or (
        camera.sensor_fit == "AUTO" and width * aspect_x >= height * aspect_y
    )
    # Pixels per unit of image plane at unit depth; non-square pixels make fx and fy differ.
    if horizontal:
        fl_x = width * camera.lens / sensor
        fl_y = fl_x * aspect_x / aspect_y
    else:
        fl_y = height * camera.lens / sensor
        fl_x = fl_y * aspect_y / aspect_x
    # A shift of 1.0 moves the view by the fitted side, sensor / lens at unit depth. Image rows run
    # downwards, so shifting the view up moves the principal point down.
    fitted_side = sensor / camera.lens
    cx = width / 2.0 - camera.shift_x * fitted_side * fl_x
    cy = height / 2.0 + camera.shift_y * fitted_side * fl_y
    return {
        "transform_matrix": _rigid_camera_to_world(camera_object),
        "fl_x": fl_x,
        "fl_y": fl_y,
        "cx": cx,
        "cy": cy,
        "w": width,
        "h": height,
    }


def sphere_cameras(
    centre: tuple[float, float, float],
    radius: float,
    count: int,
    elevation_range: tuple[float, float] = (-10.0, 60.0),
    lens: float = 50.0,
    *,
    azimuth_offset: float = 0.0,
    name: str = "Capture",
    collection=None,
) -> list:
    """Add `count` perspective cameras on a sphere around `centre`, each looking at it (world Z up).

    Elevations (degrees) are spaced evenly in sin(elevation) over `elevation_range`, so every camera
    covers an equal area of the band; azimuths step by the golden angle, so the views spread evenly
    for any count. `azimuth_offset` (degrees) turns the whole set: a second set with another offset
    shares no viewpoint with the first (held-out views). Cameras land in `collection` (default: the
    scene's); returns the camera objects in order.
    """
    import bpy
    from mathutils import Vector

    if count < 1 or not radius > 0.0 or not lens > 0.0:
        raise ValueError("sphere_cameras needs count >= 1, a positive radius and a positive lens")
    low, high = (math.radians(angle) for angle in elevation_range)
    collection = collection or bpy.context.scene.collection
    target = Vector(centre)
    cameras = []
    for index in range(count):
        fraction = (index + 0.5) / count
        elevation = math.asin(math.sin(low) + fraction * (math.sin(high) - math.sin(low)))
        azimuth = math.radians(azimuth_offset + index * GOLDEN_ANGLE)
        direction = Vector(
            (math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation))
        )
        camera = bpy.data.objects.new(f"{name}.{index:03d}", bpy.data.cameras.new(f"{name}.{index:03d}"))
        camera.data.lens = lens
        camera.location = target + radius * direction
        camera.rotation_euler = (-direction).to_track_quat("-Z", "Y").to_euler()
        collection.objects.link(camera)
        cameras.append(camera)
    return cameras


def _rigid_camera_to_world(camera_object) -> list[list[float]]:
    """matrix_world as rows, with each axis normalised so object scale does not leak into the pose."""
    matrix = [list(row) for row in camera_object.matrix_world]
    for column in range(3):
        length = math.sqrt(sum(matrix[row][column] ** 2 for row in range(3)))
        if length == 0.0:
            raise ValueError(f"camera '{camera_object.name}' has zero scale; give it a non-zero scale.")
        for row in range(3):
            matrix[row][column] /= length
    if _determinant3(matrix) < 0.0:
        raise ValueError(f"camera '{camera_object.name}' is mirrored by a negative scale; make its scale positive.")
    return matrix


def _determinant3(m: list[list[float]]) -> float:
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def write_transforms(
    path: str | os.PathLike,
    frames: list[dict],
    aabb: list[list[float]] | None = None,
    environment: dict | None = None,
) -> Path:
    """Write transforms.json into the bundle folder `path` (or to `path` if it names a .json file).

    frames: camera_frame() dicts, each with its "file_path" relative to the bundle folder added.
    aabb: [[min x, y, z], [max x, y, z]] in world units; environment: {"file_path", "rotation_z",
    "strength"}. Written to a temporary file first, so a failure never leaves half a file.
    """
    path = Path(path)
    target = path if path.suffix.lower() == ".json" else path / TRANSFORMS
    target.parent.mkdir(parents=True, exist_ok=True)
    meta: dict = {"camera_model": "OPENCV", "frames": frames}
    if aabb is not None:
        meta["aabb"] = [[float(value) for value in corner] for corner in aabb]
    if environment is not None:
        meta["environment"] = environment
    fd, temporary = tempfile.mkstemp(prefix=".transforms.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(meta, stream, indent=2)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target

"""The Blender scene as a bundle: the `transforms.json` and RGBA views the backend reads (DESIGN §3).

`capture_selected` renders the selection from a sphere of cameras; `collection_views` takes a
collection of cameras that carry photos. Runs inside Blender, so stdlib and bpy only. Cameras
become bundle frames through `camera_frame`. Intrinsics follow Blender's own definition of the
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
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
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


def camera_frame(camera_object, scene, size: tuple[int, int] | None = None) -> dict:
    """One bundle frame for a camera object: OpenGL camera-to-world and pixel intrinsics.

    matrix_world is read as it is now; after moving cameras from Python, call
    `view_layer.update()` first. Object scale is removed, as the renderers do. `size` (width,
    height) replaces the scene's render size, for a photo whose pixels are not the scene's.
    """
    if camera_object.type != "CAMERA":
        raise ValueError(f"object '{camera_object.name}' is a {camera_object.type}, not a camera; select a camera.")
    camera = camera_object.data
    if camera.type != "PERSP":
        raise ValueError(
            f"camera '{camera_object.name}' is {camera.type}; only perspective cameras can be exported, "
            "so set its type to Perspective."
        )
    width, height = size or render_size(scene)
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


# ---------------------------------------------------------------------------------------------
# Whole bundles: a selected object rendered from a sphere of cameras, or a collection of photo cameras

# Object types that render as geometry: hidden during a capture unless selected.
GEOMETRY_TYPES = {"MESH", "CURVE", "CURVES", "SURFACE", "META", "FONT", "VOLUME", "POINTCLOUD", "GREASEPENCIL"}
FIT_MARGIN = 1.1  # the object's bounding sphere fills 1 / FIT_MARGIN of the narrower half field of view
CAPTURE_LENS = 50.0
CAPTURE_SENSOR = 36.0


@dataclass
class Views:
    """A bundle folder written for the backend, how many views it holds, and what is wrong with the rest."""

    folder: Path
    source: str  # the object or collection the views show; the result is named after it
    count: int
    warnings: list[str] = field(default_factory=list)
    bounds: list[list[float]] | None = None  # world bounding box of the captured object


def selection_bounds(objects) -> list[list[float]]:
    """World-space axis-aligned bounds [[min x, y, z], [max x, y, z]] of the objects' evaluated geometry."""
    from mathutils import Vector

    corners = [obj.matrix_world @ Vector(corner) for obj in objects for corner in obj.bound_box]
    return [[min(c[axis] for c in corners) for axis in range(3)], [max(c[axis] for c in corners) for axis in range(3)]]


def capture_selected(
    context,
    folder: Path,
    count: int,
    elevation_range: tuple[float, float],
    resolution: int,
    samples: int,
    use_world: bool = True,
) -> Views:
    """Place `count` cameras around the selected objects and render RGBA views of them alone with Cycles.

    The cameras land in a fresh collection named after the object; the scene's render settings,
    camera and the other objects' visibility are restored afterwards. When the world is an
    environment texture on disk (and `use_world`), it goes into the bundle as the known lighting.
    """
    import bpy

    scene = context.scene
    objects = [obj for obj in context.selected_objects if obj.type in GEOMETRY_TYPES]
    if not objects:
        raise ValueError("select the object to capture (a mesh or other geometry) first.")
    source = (context.active_object if context.active_object in objects else objects[0]).name
    context.view_layer.update()
    bounds = selection_bounds(objects)
    centre = [(low + high) / 2.0 for low, high in zip(*bounds, strict=True)]
    radius = math.dist(bounds[0], bounds[1]) / 2.0
    if not radius > 0.0:
        raise ValueError(f"'{source}' has no size; capture an object with geometry.")
    half_fov = math.atan(CAPTURE_SENSOR / 2.0 / CAPTURE_LENS)
    distance = FIT_MARGIN * radius / math.sin(half_fov)

    collection = _fresh_collection(scene, f"LSRM Capture {source}")
    cameras = sphere_cameras(
        centre, distance, count, elevation_range, CAPTURE_LENS, name=f"{source}.view", collection=collection
    )
    for camera in cameras:
        camera.data.sensor_width = CAPTURE_SENSOR
        camera.data.sensor_fit = "AUTO"
        camera.data.clip_end = max(camera.data.clip_end, 4.0 * distance)
    context.view_layer.update()

    _clear_folder(folder)
    warnings, frames = [], []
    hidden = [obj for obj in scene.objects if obj.type in GEOMETRY_TYPES and obj not in objects]
    window_manager = context.window_manager
    with _render_settings(scene, resolution, samples), _hidden_from_render(hidden):
        window_manager.progress_begin(0, len(cameras))
        try:
            for index, camera in enumerate(cameras):
                file_path = f"images/{index:04d}.png"
                scene.camera = camera
                scene.render.filepath = str(folder / file_path)
                bpy.ops.render.render(write_still=True)
                window_manager.progress_update(index + 1)
                problem = _view_problem(folder / file_path, camera.name)
                if problem is None or problem.endswith("edge"):
                    frames.append({"file_path": file_path, **camera_frame(camera, scene)})
                if problem is not None:
                    warnings.append(problem)
        finally:
            window_manager.progress_end()

    environment = None
    if use_world:
        environment, problem = _world_environment(scene.world, folder)
        if problem:
            warnings.append(problem)
    pad = 0.05 * radius  # the box is a hint to the backend: keep the whole object inside it
    aabb = [[value - pad for value in bounds[0]], [value + pad for value in bounds[1]]]
    write_transforms(folder, frames, aabb=aabb, environment=environment)
    return Views(folder, source, len(frames), warnings, bounds)


def collection_views(scene, collection, folder: Path) -> Views:
    """A bundle from the cameras of a collection, each with its own photo (alpha is the object's mask).

    A camera's photo is its first background image, or else an image named after the camera. Cameras
    without a usable photo (none, unreadable, no transparent pixels, nothing visible, another size
    than the first: a bundle has one resolution) are skipped with a warning that says why.
    """
    import bpy

    _clear_folder(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    warnings, frames = [], []
    cameras = sorted((obj for obj in collection.all_objects if obj.type == "CAMERA"), key=lambda obj: obj.name)
    if not cameras:
        raise ValueError(f"collection '{collection.name}' holds no cameras; choose the collection of photo cameras.")
    for camera in cameras:
        image = _camera_photo(camera, bpy.data.images)
        if image is None:
            warnings.append(
                f"camera '{camera.name}' has no photo: give it a background image, or name an image after it."
            )
            continue
        size = tuple(image.size)
        if frames and size != (frames[0]["w"], frames[0]["h"]):
            first = f"{frames[0]['w']}x{frames[0]['h']}"
            warnings.append(
                f"camera '{camera.name}' is skipped: its photo is {size[0]}x{size[1]}, the first is {first}."
            )
            continue
        file_path = f"images/{len(frames):04d}.png"
        try:
            frame = camera_frame(camera, scene, size=size)
            _save_png(image, folder / file_path)
        except (ValueError, RuntimeError) as error:
            warnings.append(f"camera '{camera.name}' is skipped: {str(error).rstrip('.')}.")
            continue
        problem = _view_problem(folder / file_path, camera.name)
        if problem is None or problem.endswith("edge"):
            frames.append({"file_path": file_path, **frame})
        else:
            (folder / file_path).unlink()
        if problem is not None:
            warnings.append(problem)
    write_transforms(folder, frames)
    return Views(folder, collection.name, len(frames), warnings)


def _camera_photo(camera, images):
    for background in camera.data.background_images:
        if background.source == "IMAGE" and background.image is not None:
            return background.image
    return images.get(camera.name) or next((image for image in images if Path(image.name).stem == camera.name), None)


def _save_png(image, path: Path) -> None:
    """The photo as a PNG in the bundle: the file itself when it is one, else a PNG copy of its pixels."""
    import shutil

    import bpy

    if image.size[0] == 0 or image.size[1] == 0:
        raise ValueError(f"image '{image.name}' cannot be read")
    source = Path(bpy.path.abspath(image.filepath, library=image.library)) if image.filepath else None
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None and source.suffix.lower() == ".png" and source.is_file() and image.packed_file is None:
        shutil.copyfile(source, path)
        return
    saved_format = image.file_format
    try:
        image.file_format = "PNG"
        image.save(filepath=str(path), save_copy=True)  # a copy: the image keeps its own file
    finally:
        image.file_format = saved_format


def _view_problem(path: Path, camera_name: str) -> str | None:
    """What is wrong with a view's alpha mask, or None: unusable ('...') or only a warning ('... edge')."""
    import bpy

    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        pixels = array("f", bytes(4 * 4 * width * height))
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    alpha = pixels[3::4]
    covered = sum(1 for value in alpha if value > 0.5)
    if covered == 0:
        return f"view '{camera_name}' does not see the object; it is left out."
    if covered == len(alpha):
        return f"view '{camera_name}' has no transparent pixels (alpha is the mask); cut out its background."
    rows = range(height)
    border = [alpha[x] for x in range(width)] + [alpha[(height - 1) * width + x] for x in range(width)]
    border += [alpha[y * width] for y in rows] + [alpha[y * width + width - 1] for y in rows]
    if max(border) > 0.5:
        return f"view '{camera_name}' cuts the object off at the image edge"
    return None


def _world_environment(world, folder: Path) -> tuple[dict | None, str | None]:
    """The world's environment texture as the bundle's known lighting, or why it cannot be sent."""
    import shutil

    import bpy

    tree = getattr(world, "node_tree", None)
    output = (
        next((n for n in tree.nodes if n.bl_idname == "ShaderNodeOutputWorld" and n.is_active_output), None)
        if tree
        else None
    )
    background = _linked_node(output, "Surface")
    texture = (
        _linked_node(background, "Color") if background and background.bl_idname == "ShaderNodeBackground" else None
    )
    if texture is None or texture.bl_idname != "ShaderNodeTexEnvironment" or texture.image is None:
        return None, None  # not an environment world: the backend estimates the lighting
    image = texture.image
    source = Path(bpy.path.abspath(image.filepath, library=image.library))
    if image.packed_file is not None or source.suffix.lower() not in (".exr", ".hdr") or not source.is_file():
        return None, f"the world's image '{image.name}' is not an .exr or .hdr file on disk, so it is not sent"
    mapping = _linked_node(texture, "Vector")
    rotation = (
        mapping.inputs["Rotation"].default_value[2] if mapping and mapping.bl_idname == "ShaderNodeMapping" else 0.0
    )
    strength = background.inputs["Strength"]
    name = f"environment{source.suffix.lower()}"
    shutil.copyfile(source, folder / name)
    return {"file_path": name, "rotation_z": float(rotation), "strength": float(strength.default_value)}, None


def _linked_node(node, socket: str):
    if node is None or socket not in node.inputs or not node.inputs[socket].links:
        return None
    return node.inputs[socket].links[0].from_node


def _fresh_collection(scene, name: str):
    """An empty collection named `name` in the scene (a previous capture's cameras are deleted)."""
    import bpy

    collection = bpy.data.collections.get(name)
    if collection is None:
        collection = bpy.data.collections.new(name)
    for obj in list(collection.objects):
        data = obj.data
        bpy.data.objects.remove(obj)
        if data is not None and data.users == 0:
            bpy.data.cameras.remove(data)
    if collection.name not in scene.collection.children:
        scene.collection.children.link(collection)
    return collection


def _clear_folder(folder: Path) -> None:
    """Make `folder` empty (a previous bundle's images must not linger)."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


@contextmanager
def _render_settings(scene, resolution: int, samples: int):
    """Cycles RGBA PNG renders on a transparent film with the Standard view; the user's settings come back."""
    render, cycles, image, view = scene.render, scene.cycles, scene.render.image_settings, scene.view_settings
    changes = [
        (render, "engine", "CYCLES"),
        (render, "resolution_x", resolution),
        (render, "resolution_y", resolution),
        (render, "resolution_percentage", 100),
        (render, "pixel_aspect_x", 1.0),
        (render, "pixel_aspect_y", 1.0),
        (render, "film_transparent", True),
        (render, "use_border", False),
        (render, "filepath", render.filepath),
        (cycles, "samples", samples),
        (cycles, "use_denoising", False),
        (image, "file_format", "PNG"),
        (image, "color_mode", "RGBA"),
        (image, "color_depth", "8"),
        (view, "view_transform", "Standard"),  # PNG pixels must be sRGB-encoded linear values
        (view, "look", "None"),
        (view, "exposure", 0.0),
        (view, "gamma", 1.0),
        (scene, "camera", scene.camera),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    try:
        for owner, name, value in changes:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextmanager
def _hidden_from_render(objects):
    saved = [(obj, obj.hide_render) for obj in objects]
    try:
        for obj in objects:
            obj.hide_render = True
        yield
    finally:
        for obj, hidden in saved:
            obj.hide_render = hidden

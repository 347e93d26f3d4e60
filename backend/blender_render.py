"""Headless Blender (the bpy module) for evaluation and tests: Cycles set-up, worlds, renders, assets.

bpy is imported lazily, so the backend runs without it; every entry point that needs it raises
InputError with the fix when it is missing. Renders are linear: Cycles on the CPU, no denoiser,
the Standard view transform, 32-bit EXR output (scene-referred values, premultiplied alpha when the
film is transparent), so they compare directly with our own renderer and with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .exr import read_exr_rgba
from .mesh import sample_triangles

if TYPE_CHECKING:
    import bpy

ASSET_SUFFIXES = (".glb", ".gltf", ".obj")


def require_bpy() -> ModuleType:
    """The bpy module, or an InputError that says how to get it."""
    try:
        import bpy
    except ImportError:
        raise InputError(
            "evaluate needs the bpy module (headless Blender): run `make setup-test` to install it into .venv, "
            "then run the command again with .venv/bin/python"
        ) from None
    return bpy


def empty_scene() -> None:
    """Start from an empty scene with factory settings (the bundled glTF and OBJ importers stay on)."""
    require_bpy().ops.wm.read_homefile(use_empty=True, use_factory_startup=True)


def use_cycles(
    width: int, height: int, samples: int = 32, transparent: bool = True, seed: int = 0, persistent: bool = False
) -> bpy.types.Scene:
    """Render the current scene with Cycles on the CPU: linear output, no denoiser, no filmic.

    persistent keeps Cycles' scene (BVH, shaders, images) between renders: identical pixels, and
    a small render after the first takes ~1% of the time (measured: 0.04 s against 4 s at 48 px).
    """
    scene = require_bpy().context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.seed = seed
    scene.render.use_persistent_data = persistent
    scene.cycles.use_denoising = False
    scene.cycles.use_adaptive_sampling = False
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = transparent
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    scene.display_settings.display_device = "sRGB"
    return scene


def set_world_environment(path: Path, rotation_z: float = 0.0, strength: float = 1.0) -> None:
    """Light the scene by an equirectangular environment map, rotated about world Z (radians)."""
    bpy = require_bpy()
    world = bpy.data.worlds.new("Environment")
    bpy.context.scene.world = world
    if world.node_tree is None:  # Blender 5 gives new worlds a node tree (use_nodes is deprecated); 4.x does not
        world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    nodes.clear()
    coords = nodes.new("ShaderNodeTexCoord")
    mapping = nodes.new("ShaderNodeMapping")
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, rotation_z)
    texture = nodes.new("ShaderNodeTexEnvironment")
    texture.image = bpy.data.images.load(str(path), check_existing=True)
    background = nodes.new("ShaderNodeBackground")
    background.inputs["Strength"].default_value = strength
    output = nodes.new("ShaderNodeOutputWorld")
    links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    links.new(mapping.outputs["Vector"], texture.inputs["Vector"])
    links.new(texture.outputs["Color"], background.inputs["Color"])
    links.new(background.outputs["Background"], output.inputs["Surface"])


def render_linear_rgba(path: Path) -> np.ndarray:
    """Render the scene's camera to a 32-bit EXR at `path` and return its linear RGBA pixels [H, W, 4].

    EXR keeps scene-referred linear values (no view transform), so they compare directly with ours.
    """
    bpy = require_bpy()
    scene = bpy.context.scene
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_depth = "32"
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    return read_exr_rgba(path, "the Cycles render")


# ----------------------------------------------------------------------------- assets


def check_asset(path: Path) -> Path:
    """The asset path, checked to exist and to be a format we import (GLB/glTF or OBJ)."""
    path = Path(path)
    if path.suffix.lower() not in ASSET_SUFFIXES:
        raise InputError(
            f"asset '{path}' has the unsupported extension '{path.suffix}'; give a .glb, .gltf or .obj file"
        )
    if not path.is_file():
        raise InputError(f"asset '{path}' does not exist; check the path")
    return path


def import_asset(path: Path) -> list:
    """Import a GLB/glTF or OBJ (+MTL beside it) into the current scene; return its mesh objects.

    Both importers convert to Blender's frame (Z up). Raises InputError when nothing with faces arrives.
    """
    bpy = require_bpy()
    path = check_asset(path)
    before = set(bpy.data.objects)
    try:
        if path.suffix.lower() == ".obj":
            bpy.ops.wm.obj_import(filepath=str(path))
        else:
            bpy.ops.import_scene.gltf(filepath=str(path))
    except RuntimeError as error:  # the importers report unreadable files this way
        raise InputError(f"asset '{path}' cannot be imported ({error}); check that the file is valid") from None
    meshes = [o for o in bpy.data.objects if o not in before and o.type == "MESH"]
    bpy.context.view_layer.update()
    if not meshes or sum(len(o.data.polygons) for o in meshes) == 0:
        raise InputError(f"asset '{path}' holds no mesh with faces; give a file that contains a surface")
    return meshes


def _world_triangles(objects: Sequence) -> np.ndarray:
    """Every triangle of the objects' evaluated meshes (modifiers applied) in world space, [T, 3, 3]."""
    bpy = require_bpy()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    triangles = []
    for obj in objects:
        evaluated = obj.evaluated_get(depsgraph)
        mesh = evaluated.to_mesh()
        try:
            mesh.calc_loop_triangles()
            vertices = np.empty(len(mesh.vertices) * 3, np.float64)
            mesh.vertices.foreach_get("co", vertices)
            corners = np.empty(len(mesh.loop_triangles) * 3, np.int64)
            mesh.loop_triangles.foreach_get("vertices", corners)
        finally:
            evaluated.to_mesh_clear()
        matrix = np.array(obj.matrix_world, dtype=np.float64)
        world = vertices.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
        corners = corners.reshape(-1, 3)
        if np.linalg.det(matrix[:3, :3]) < 0.0:  # a mirroring transform turns the winding inside out
            corners = corners[:, ::-1]
        triangles.append(world[corners])
    return np.concatenate(triangles)


def world_bounds(objects: Sequence) -> np.ndarray:
    """Axis-aligned world-space bounds [2, 3] (min, max) of the objects' evaluated meshes."""
    corners = _world_triangles(objects).reshape(-1, 3)
    return np.stack([corners.min(axis=0), corners.max(axis=0)])


def sample_surface(objects: Sequence, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted random points on the objects' surfaces and their face normals, world space, [N, 3] each."""
    return sample_triangles(_world_triangles(objects), count, seed)


def bounding_sphere(bounds: np.ndarray) -> tuple[tuple[float, float, float], float]:
    """Centre and radius of the sphere through the corners of bounds [2, 3]."""
    centre = (bounds[0] + bounds[1]) / 2.0
    return tuple(float(c) for c in centre), float(np.linalg.norm(bounds[1] - bounds[0]) / 2.0)

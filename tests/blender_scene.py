"""Scene building blocks for tests that render with headless Blender (bpy module).

Import only inside tests that use the `bpy` fixture. Functions here set up what several
tests need (Cycles on the CPU, a world lit by an environment map); add to this module
rather than writing the same scene code twice.
"""

import math
from pathlib import Path

import bpy
import numpy as np
import OpenEXR


def use_cycles(width: int, height: int, samples: int = 32, transparent: bool = True) -> bpy.types.Scene:
    """Render the current scene with Cycles on the CPU: linear output, no denoiser, no filmic."""
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
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
    world = bpy.data.worlds.new("Environment")
    bpy.context.scene.world = world
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


def studio_world(name: str = "studio") -> Path:
    """Path of one of the CC0 studio-light worlds that ship inside the bpy module."""
    return Path(bpy.utils.system_resource("DATAFILES", path="studiolights/world")) / f"{name}.exr"


def deg(angle: float) -> float:
    return math.radians(angle)


def add_emissive_sphere(name: str, location, radius: float, colour, strength: float = 1.0) -> bpy.types.Object:
    """A UV sphere that glows with `colour` (linear RGB) and needs no lights."""
    bpy.ops.mesh.primitive_uv_sphere_add(segments=32, ring_count=16, radius=radius, location=location)
    sphere = bpy.context.active_object
    sphere.name = name
    material = bpy.data.materials.new(name)  # new materials have a node tree in Blender 5
    nodes = material.node_tree.nodes
    nodes.clear()
    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Color"].default_value = (*colour, 1.0)
    emission.inputs["Strength"].default_value = strength
    output = nodes.new("ShaderNodeOutputMaterial")
    material.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    sphere.data.materials.append(material)
    return sphere


def add_camera_looking_at(name: str, location, target=(0.0, 0.0, 0.0), lens: float = 50.0) -> bpy.types.Object:
    """A perspective camera at `location` aimed at `target`, world Z up."""
    from mathutils import Vector

    camera = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    bpy.context.scene.collection.objects.link(camera)
    camera.location = location
    camera.rotation_euler = (Vector(target) - Vector(location)).to_track_quat("-Z", "Y").to_euler()
    camera.data.lens = lens
    return camera


def render_linear_rgba(path: Path) -> np.ndarray:
    """Render the scene's camera to a 32-bit EXR at `path` and return its linear RGBA pixels [H, W, 4].

    EXR keeps scene-referred linear values (no view transform), so they compare directly with ours.
    """
    scene = bpy.context.scene
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_depth = "32"
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    with OpenEXR.File(str(path), separate_channels=True) as exr:
        channels = {name.split(".")[-1].upper(): channel.pixels for name, channel in exr.channels().items()}
    return np.stack([channels[c] for c in "RGBA"], axis=-1).astype(np.float32)

"""Scene building blocks for tests that render with headless Blender (bpy module).

Import only inside tests that use the `bpy` fixture. Functions here set up what several
tests need (Cycles on the CPU, a world lit by an environment map); add to this module
rather than writing the same scene code twice.
"""

import math
from pathlib import Path

import bpy


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

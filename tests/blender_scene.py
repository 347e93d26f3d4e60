"""Scene building blocks for tests that render with headless Blender (bpy module).

Import only inside tests that use the `bpy` fixture. Cycles set-up, environment worlds and linear
renders live in backend/blender_render.py (evaluation uses them too) and are re-exported here;
this module adds the scene pieces only tests need. Add to these rather than writing the same
scene code twice.
"""

import math
from pathlib import Path

import bpy

from backend.blender_render import render_linear_rgba, set_world_environment, use_cycles

__all__ = [
    "add_camera_looking_at",
    "add_emissive_sphere",
    "deg",
    "render_linear_rgba",
    "set_world_environment",
    "studio_world",
    "use_cycles",
]


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

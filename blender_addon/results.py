"""Bring a reconstructed GLB into the scene: Blender's glTF importer, named after the source, in a collection.

The backend writes the GLB in the bundle's world frame, so the imported object already sits over its
source. The importer wires the materials (Principled BSDF; base colour sRGB, metallic-roughness
Non-Color through Separate Color). An import that fails or brings no mesh removes everything it
added, so nothing is left half-imported.
"""

from __future__ import annotations

from pathlib import Path

import bpy

from .client import BackendError

COLLECTION = "LSRM Results"
_DATA = ("objects", "meshes", "materials", "images", "textures", "node_groups")


def import_result(path: Path, name: str, context=None) -> list:
    """Import the GLB at `path`; its objects are named `name` (first mesh) and linked into COLLECTION only."""
    context = context or bpy.context
    before = {kind: set(getattr(bpy.data, kind)) for kind in _DATA}
    try:
        bpy.ops.import_scene.gltf(filepath=str(path))
        added = [obj for obj in bpy.data.objects if obj not in before["objects"]]
        meshes = [obj for obj in added if obj.type == "MESH" and len(obj.data.polygons) > 0]
        if not meshes:
            raise BackendError(f"the result '{path.name}' holds no mesh; reconstruct again.")
    except RuntimeError as error:
        _remove_added(before)
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise BackendError(f"the result '{path.name}' cannot be imported ({reason}); reconstruct again.") from None
    except BackendError:
        _remove_added(before)
        raise
    collection = results_collection(context.scene)
    for obj in added:
        for owner in list(obj.users_collection):
            owner.objects.unlink(obj)
        collection.objects.link(obj)
    meshes[0].name = name
    meshes[0].data.name = name
    context.view_layer.update()
    return added


def results_collection(scene):
    collection = bpy.data.collections.get(COLLECTION) or bpy.data.collections.new(COLLECTION)
    if collection.name not in scene.collection.children:
        scene.collection.children.link(collection)
    return collection


def _remove_added(before: dict[str, set]) -> None:
    """Delete every datablock created since `before` was taken (objects first: they use the rest)."""
    for kind in _DATA:
        blocks = getattr(bpy.data, kind)
        for block in [block for block in blocks if block not in before[kind]]:
            blocks.remove(block)

"""Writing a textured mesh as one self-contained binary glTF (GLB) with a PBR material.

Frames: meshes arrive in Blender's world frame (Z up); glTF is Y up, so every position and normal
goes through (x, y, z) -> (x, z, -y), the rotation Blender's importer undoes. The node carries the
centre of the mesh's bounds as its translation, so the imported object's origin sits at its centre
and it lands exactly where the surface was.

Textures follow glTF's rules: the base colour is sRGB-encoded; the metallic-roughness image is
linear with roughness in G and metallic in B (R is unused and set to 1); the normal map is linear,
tangent space with +Y up.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pygltflib
import torch
from PIL import Image

from .atomic import atomic_file
from .bake import Textures
from .colour import linear_to_srgb
from .mesh import Mesh

# Blender (Z up) to glTF (Y up): a proper rotation, so face winding is kept.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def png_bytes(image: torch.Tensor) -> bytes:
    """PNG encoding of an image [H, W, C] with values in [0, 1] (stored as given: no colour transform)."""
    pixels = (image.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def texture_pngs(textures: Textures) -> dict[str, bytes]:
    """The material's images, encoded the way glTF reads them."""
    roughness, metallic = textures.roughness, textures.metallic
    packed = torch.stack([torch.ones_like(roughness), roughness, metallic], dim=-1)
    images = {
        "base_colour": png_bytes(linear_to_srgb(textures.base_colour)),
        "metallic_roughness": png_bytes(packed),
    }
    if textures.normal is not None:
        images["normal"] = png_bytes(textures.normal * 0.5 + 0.5)
    return images


class _BinaryBuffer:
    """The GLB's one binary chunk, built view by view with glTF's 4-byte alignment."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.views: list[pygltflib.BufferView] = []

    def add(self, payload: bytes, target: int | None = None) -> int:
        self.data.extend(b"\0" * (-len(self.data) % 4))
        self.views.append(
            pygltflib.BufferView(buffer=0, byteOffset=len(self.data), byteLength=len(payload), target=target)
        )
        self.data.extend(payload)
        return len(self.views) - 1


def write_glb(mesh: Mesh, textures: Textures, path: str | Path, name: str = "asset") -> Path:
    """Write mesh (world frame, Z up, with normals and uvs) and its textures as a GLB, atomically."""
    if mesh.normals is None or mesh.uvs is None:
        raise ValueError("write_glb needs a mesh with vertex normals and uvs")
    positions = mesh.vertices.astype(np.float64) @ Z_UP_TO_Y_UP.T
    centre = (positions.min(axis=0) + positions.max(axis=0)) / 2.0
    positions = (positions - centre).astype(np.float32)
    normals = (mesh.normals.astype(np.float64) @ Z_UP_TO_Y_UP.T).astype(np.float32)
    uvs = mesh.uvs.astype(np.float32)
    indices = mesh.faces.astype(np.uint32).reshape(-1)

    binary = _BinaryBuffer()
    accessors = []

    def accessor(array: np.ndarray, kind: str, target: int, bounds: bool = False) -> int:
        view = binary.add(array.tobytes(), target)
        component = pygltflib.UNSIGNED_INT if array.dtype == np.uint32 else pygltflib.FLOAT
        extra = {"min": array.min(axis=0).tolist(), "max": array.max(axis=0).tolist()} if bounds else {}
        accessors.append(
            pygltflib.Accessor(bufferView=view, componentType=component, count=len(array), type=kind, **extra)
        )
        return len(accessors) - 1

    attributes = pygltflib.Attributes(
        POSITION=accessor(positions, pygltflib.VEC3, pygltflib.ARRAY_BUFFER, bounds=True),
        NORMAL=accessor(normals, pygltflib.VEC3, pygltflib.ARRAY_BUFFER),
        TEXCOORD_0=accessor(uvs, pygltflib.VEC2, pygltflib.ARRAY_BUFFER),
    )
    index_accessor = accessor(indices, pygltflib.SCALAR, pygltflib.ELEMENT_ARRAY_BUFFER)

    pngs = texture_pngs(textures)
    images = [pygltflib.Image(name=key, mimeType="image/png", bufferView=binary.add(png)) for key, png in pngs.items()]
    texture_index = {key: i for i, key in enumerate(pngs)}
    material = pygltflib.Material(
        name=f"{name}_material",
        pbrMetallicRoughness=pygltflib.PbrMetallicRoughness(
            baseColorTexture=pygltflib.TextureInfo(index=texture_index["base_colour"]),
            metallicRoughnessTexture=pygltflib.TextureInfo(index=texture_index["metallic_roughness"]),
            metallicFactor=1.0,
            roughnessFactor=1.0,
        ),
        normalTexture=pygltflib.NormalMaterialTexture(index=texture_index["normal"]) if "normal" in pngs else None,
    )
    gltf = pygltflib.GLTF2(
        asset=pygltflib.Asset(version="2.0", generator="LSRM for Blender"),
        scene=0,
        scenes=[pygltflib.Scene(nodes=[0])],
        nodes=[pygltflib.Node(name=name, mesh=0, translation=centre.tolist())],
        meshes=[
            pygltflib.Mesh(
                name=name,
                primitives=[pygltflib.Primitive(attributes=attributes, indices=index_accessor, material=0)],
            )
        ],
        materials=[material],
        samplers=[pygltflib.Sampler(magFilter=pygltflib.LINEAR, minFilter=pygltflib.LINEAR_MIPMAP_LINEAR)],
        textures=[pygltflib.Texture(sampler=0, source=i) for i in range(len(images))],
        images=images,
        accessors=accessors,
        bufferViews=binary.views,
        buffers=[pygltflib.Buffer(byteLength=len(binary.data))],
    )
    gltf.set_binary_blob(bytes(binary.data))
    path = Path(path)
    with atomic_file(path) as tmp:
        gltf.save_binary(str(tmp))
    return path

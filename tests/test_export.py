"""UV baking, GLB writing and the export entry point: real files, read back and validated."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from backend.bake import AtlasConfig, bake, fill_empty, rasterise_uvs, spatial_pieces, uv_atlas
from backend.cameras import Normalisation
from backend.colour import srgb_to_linear
from backend.errors import InputError
from backend.export import export_glb
from backend.gltf import Z_UP_TO_Y_UP
from backend.mesh import clean, extract_surface, with_normals
from tests.test_mesh import AnalyticField

REPO = Path(__file__).resolve().parents[1]
VALIDATOR = REPO / "tests" / "gltf_validator"
NORMALISATION = Normalisation(centre=torch.tensor([1.0, -2.0, 0.5]), scale=2.0)  # world = canonical / 2 + centre


def read_glb(path: Path) -> tuple[pygltflib.GLTF2, bytes]:
    gltf = pygltflib.GLTF2.load_binary(str(path))
    return gltf, gltf.binary_blob()


def accessor_array(gltf: pygltflib.GLTF2, blob: bytes, index: int) -> np.ndarray:
    accessor = gltf.accessors[index]
    view = gltf.bufferViews[accessor.bufferView]
    dtype = np.uint32 if accessor.componentType == pygltflib.UNSIGNED_INT else np.float32
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[accessor.type]
    data = np.frombuffer(blob, dtype=dtype, count=accessor.count * width, offset=view.byteOffset)
    return data.reshape(accessor.count, width)


def image_array(gltf: pygltflib.GLTF2, blob: bytes, texture_index: int) -> np.ndarray:
    view = gltf.bufferViews[gltf.images[gltf.textures[texture_index].source].bufferView]
    png = blob[view.byteOffset : view.byteOffset + view.byteLength]
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def sphere_glb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "sphere.glb"
    return export_glb(AnalyticField(), out, NORMALISATION, resolution=64, texture_size=256, target_faces=3000)


def test_rasterised_texels_lie_inside_their_triangles_and_cover_the_square():
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    face, weights = rasterise_uvs(uvs, faces, 16)
    assert (face >= 0).all()
    centres = (torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="xy"), -1) + 0.5) / 16
    interpolated = (uvs[faces[face]] * weights[..., None]).sum(-2)
    torch.testing.assert_close(interpolated, centres.float(), atol=1e-5, rtol=0)
    assert (weights >= -1e-6).all()


def test_fill_empty_reaches_every_texel_and_keeps_filled_ones():
    image = torch.zeros(32, 32, 3)
    filled = torch.zeros(32, 32, dtype=torch.bool)
    filled[4:10, 4:10], filled[20:28, 18:30] = True, True
    image[4:10, 4:10], image[20:28, 18:30] = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    result = fill_empty(image, filled, rings=3)
    torch.testing.assert_close(result[filled], image[filled])
    assert (result.sum(-1) > 0.99).all()  # every texel holds a blend of the two colours, none stays black
    torch.testing.assert_close(result[11, 6], torch.tensor([1.0, 0.0, 0.0]))  # within the rings: the chart's own


def test_spatial_pieces_partition_the_faces_into_bounded_compact_pieces():
    field = AnalyticField()
    mesh = clean(extract_surface(field, 48))
    pieces = spatial_pieces(mesh.vertices, mesh.faces, 300)
    assert max(len(p) for p in pieces) <= 300 and min(len(p) for p in pieces) >= 150  # median cuts: balanced
    np.testing.assert_array_equal(np.sort(np.concatenate(pieces)), np.arange(mesh.face_count))
    extents = [np.ptp(mesh.vertices[mesh.faces[p]].reshape(-1, 3), axis=0).max() for p in pieces]
    assert max(extents) < 0.8  # patches of a sphere of radius 0.6, not strips across it


def test_uv_atlas_of_many_pieces_keeps_the_surface_and_packs_charts_without_overlap():
    field = AnalyticField()
    mesh = with_normals(clean(extract_surface(field, 48)), field)
    size = 512
    atlas = uv_atlas(mesh, size, AtlasConfig(piece_faces=400))
    assert atlas.face_count == mesh.face_count
    assert 0.0 <= atlas.uvs.min() and atlas.uvs.max() <= 1.0
    # Every atlas vertex is a copy of an input vertex (seams duplicate, nothing moves), and the
    # triangles are the input's: the same total area.
    assert np.isclose(atlas.area(), mesh.area(), rtol=1e-5)
    distance, _ = cKDTree(mesh.vertices).query(atlas.vertices)
    assert distance.max() == 0.0
    # Charts do not overlap: the texel centres covered equal the summed UV areas (up to chart borders).
    corners = atlas.uvs[atlas.faces] * size
    uv_area = 0.5 * np.abs(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])).sum()
    face, _ = rasterise_uvs(torch.as_tensor(atlas.uvs), torch.as_tensor(atlas.faces), size)
    assert (face >= 0).sum().item() == pytest.approx(uv_area, rel=0.03)
    assert uv_area > 0.4 * size * size  # packed tightly, as one piece would be
    # Baking through the many-piece atlas: covered texels hold the field's value at the vertices.
    textures = bake(field, atlas, size)
    texel = np.clip((atlas.uvs * size).astype(int), 0, size - 1)
    error = (textures.roughness[texel[:, 1], texel[:, 0]] - field(torch.as_tensor(atlas.vertices)).roughness).abs()
    covered = textures.coverage[texel[:, 1], texel[:, 0]]
    assert error[covered].max() < 0.01
    # A vertex whose nearest texel lies outside its chart reads a dilated value; still close for nearly all.
    assert error.quantile(0.99) < 0.01


def test_baked_textures_reproduce_the_field_at_the_vertices():
    field = AnalyticField()
    mesh = uv_atlas(with_normals(clean(extract_surface(field, 64)), field), 512)
    assert len(spatial_pieces(mesh.vertices, mesh.faces, AtlasConfig().piece_faces)) > 1  # the pieces path runs
    textures = bake(field, mesh, 512)
    assert textures.coverage.float().mean() > 0.4  # xatlas packs the charts tightly
    # Look the textures up at the vertices' uvs (nearest texel) and compare with the field there.
    texel = np.clip((mesh.uvs * 512).astype(int), 0, 511)
    truth = field(torch.as_tensor(mesh.vertices))
    baked_roughness = textures.roughness[texel[:, 1], texel[:, 0]]
    baked_metallic = textures.metallic[texel[:, 1], texel[:, 0]]
    baked_albedo = textures.base_colour[texel[:, 1], texel[:, 0]]
    assert (baked_roughness - truth.roughness).abs().max() < 0.01  # smooth maps: texel-size error only
    assert (baked_metallic - truth.metallic).abs().max() < 0.02
    assert (baked_albedo - truth.albedo).abs().amax(-1).median() < 0.01  # checker edges aside


def test_normal_map_of_a_smooth_sphere_points_straight_out():
    field = AnalyticField()
    mesh = uv_atlas(with_normals(clean(extract_surface(field, 48)), field), 256)
    textures = bake(field, mesh, 256, normal_map=True)
    normals = textures.normal[textures.coverage]
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(len(normals)))
    assert normals[:, 2].min() > 0.98  # vertex normals are already the SDF's: little left to encode


def test_glb_holds_the_mesh_in_world_space_with_gltf_axes(sphere_glb):
    gltf, blob = read_glb(sphere_glb)
    primitive = gltf.meshes[0].primitives[0]
    translation = np.array(gltf.nodes[0].translation)
    positions = accessor_array(gltf, blob, primitive.attributes.POSITION) + translation
    world = positions @ Z_UP_TO_Y_UP  # glTF Y up back to Blender's Z up
    radius = 0.6 / NORMALISATION.scale
    np.testing.assert_allclose(np.linalg.norm(world - NORMALISATION.centre.numpy(), axis=1), radius, atol=0.01)
    normals = accessor_array(gltf, blob, primitive.attributes.NORMAL)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    assert len(accessor_array(gltf, blob, primitive.indices)) == pytest.approx(3 * 3000, rel=0.05)
    assert gltf.nodes[0].name == "sphere"


def test_glb_material_follows_gltf_texture_rules(sphere_glb):
    gltf, blob = read_glb(sphere_glb)
    material = gltf.materials[0].pbrMetallicRoughness
    assert material.metallicFactor == material.roughnessFactor == 1.0
    base = image_array(gltf, blob, material.baseColorTexture.index)
    packed = image_array(gltf, blob, material.metallicRoughnessTexture.index)
    assert base.shape == (256, 256, 3) and packed.shape == (256, 256, 3)
    assert (packed[..., 0] == 1.0).all()  # R is unused
    # The sphere's roughness spans 0.2 .. 0.8 and metallic 0.2 .. 0.8 (x in -0.6 .. 0.6), stored linearly.
    assert 0.18 < packed[..., 1].min() and packed[..., 1].max() < 0.82
    assert 0.18 < packed[..., 2].min() and packed[..., 2].max() < 0.82
    # Base colour is sRGB-encoded: red of the checker's two tiles is linear 0.1 and 0.9.
    red = srgb_to_linear(torch.as_tensor(base[..., 0]))
    assert torch.isclose(red, torch.tensor(0.1), atol=0.01).float().mean() > 0.2
    assert torch.isclose(red, torch.tensor(0.9), atol=0.01).float().mean() > 0.2


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("normal_map", [False, True], ids=["plain", "normal-map"])
def test_glb_passes_the_khronos_validator(tmp_path, normal_map):
    if not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("run `npm ci --prefix tests/gltf_validator` (make setup-test does) to install gltf-validator")
    field = AnalyticField(spheres=[(0.2, -0.1, 0.05, 0.45)], boxes=[(-0.3, 0.25, -0.2, 0.35, 0.2, 0.5, 0.05)])
    out = export_glb(
        field, tmp_path / "asset.glb", NORMALISATION, resolution=48, texture_size=128, normal_map=normal_map
    )
    result = subprocess.run(
        ["node", str(VALIDATOR / "validate.js"), str(out)], capture_output=True, text=True, timeout=120, check=True
    )
    issues = json.loads(result.stdout)["issues"]
    assert issues["numErrors"] == 0, json.dumps(issues["messages"], indent=1)
    # The only warning allowed: a normal map without stored tangents (the importer computes MikkTSpace).
    codes = {message["code"] for message in issues["messages"] if message["severity"] <= 1}
    assert codes <= ({"MESH_PRIMITIVE_GENERATED_TANGENT_SPACE"} if normal_map else set())


def test_export_reports_stage_timings_and_face_counts(tmp_path):
    stats: dict[str, float] = {}
    export_glb(AnalyticField(), tmp_path / "a.glb", NORMALISATION, resolution=40, texture_size=128, stats=stats)
    for stage in ("marching cubes", "cleanup + simplify", "uv atlas", "bake", "write"):
        assert stats[f"{stage} s"] >= 0.0
    assert stats["final faces"] <= stats["clean faces"] <= stats["marching cubes faces"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"resolution": 8}, "resolution 8 is outside"),
        ({"resolution": 5000}, "resolution 5000 is outside"),
        ({"texture_size": 1000}, "texture size 1000 is not a power of two"),
        ({"texture_size": 32}, "texture size 32 is not a power of two"),
        ({"target_faces": 12}, "target face count 12 is too small"),
        ({"name": "asset.obj"}, "must end in .glb"),
    ],
)
def test_export_rejects_bad_arguments_and_writes_nothing(tmp_path, arguments, message):
    out = tmp_path / arguments.pop("name", "asset.glb")
    with pytest.raises(InputError, match=message):
        export_glb(AnalyticField(), out, NORMALISATION, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_field_without_surface_says_so_and_writes_nothing(tmp_path):
    empty = AnalyticField(spheres=[(4.0, 0.0, 0.0, 0.5)])
    with pytest.raises(InputError, match="the field has no surface inside the box"):
        export_glb(empty, tmp_path / "empty.glb", NORMALISATION, resolution=32)
    assert list(tmp_path.iterdir()) == []

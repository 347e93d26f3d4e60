"""Real textured models for training: SweetHome3D furniture (Debian package sweethome3d-furniture).

Each OBJ model (with its MTL colours and textures) becomes a `MeshGridField`: a cell-centred grid of
signed distance, albedo and roughness in the canonical box, which our renderer then renders like any
other field, so furniture views come out of the same renderer and lighting as procedural ones.

How a mesh becomes the grid, simply: sample many surface points (area-weighted, with their texture
colours); each grid point takes the distance to, and the colour of, its nearest sample. Points that
are reachable from the box's border without crossing the surface band are outside; the rest of the
grid is inside. Open sheets (leaves, cloth, paper) have no inside, so every surface is thickened by
`THICKNESS` voxels: a sheet becomes a thin solid and a closed surface grows by that much. Metallic is
zero (OBJ materials do not say), roughness comes from the MTL's Phong exponent.

Only the CC0 and CC-BY archives are used, and the development set's models (bench/devset.json) are
left out, so evaluation never sees a training object.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..cameras import Normalisation
from ..colour import srgb_to_linear
from ..errors import InputError
from ..field import FieldSample, read_dense, voxel_centres
from ..render import RenderOptions
from .synthetic import GROUND_TRUTH_BETA, OBJECT_HALF_EXTENT, sample_cameras
from .views import EnvironmentBank, ViewSet, render_viewset

FURNITURE_DIR = Path("/usr/share/sweethome3d/furniture")
ARCHIVES = ("BlendSwap-CC-0.sh3f", "BlendSwap-CC-BY.sh3f")  # clear licences (CC0-1.0, CC-BY-3.0)
DEVSET = Path(__file__).resolve().parents[2] / "bench" / "devset.json"
THICKNESS = 0.6  # voxels added around every surface (makes open sheets solid)
SURFACE_SAMPLES = 200_000


@dataclass
class Mesh:
    """Triangles [F, 3, 3] (canonical frame, Z up) with per-corner UVs [F, 3, 2] and a material per face."""

    triangles: Tensor
    uvs: Tensor
    material: Tensor  # [F] index into colours / textures / roughness
    colours: list[Tensor]  # linear Kd [3] per material
    textures: list[Tensor | None]  # linear [H, W, 3] per material, or None
    roughness: list[float]


def _read_mtl(text: str, archive: zipfile.ZipFile, folder: PurePosixPath) -> dict[str, tuple]:
    materials: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "newmtl":
            current = materials.setdefault(" ".join(parts[1:]), [torch.full((3,), 0.8), None, 0.5])
        elif current is not None and parts[0] == "Kd" and len(parts) >= 4:
            current[0] = srgb_to_linear(torch.tensor([float(v) for v in parts[1:4]]).clamp(0, 1))
        elif current is not None and parts[0] == "Ns":
            current[2] = float(np.clip(np.sqrt(2.0 / (float(parts[1]) + 2.0)), 0.05, 1.0))  # Phong -> GGX-ish
        elif current is not None and parts[0] == "map_Kd":
            name = str(folder / PurePosixPath(parts[-1].replace("\\", "/")).name)
            if name in archive.namelist():
                image = Image.open(io.BytesIO(archive.read(name))).convert("RGB")
                image.thumbnail((512, 512))
                current[1] = srgb_to_linear(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    return {name: tuple(value) for name, value in materials.items()}


def read_model(archive_path: Path, model: str) -> Mesh:
    """A furniture OBJ (polygons fan-triangulated, Y up) fitted into the canonical box, Z up."""
    folder = PurePosixPath(model).parent
    with zipfile.ZipFile(archive_path) as archive:
        text = archive.read(model).decode("utf-8", errors="replace")
        library: dict[str, tuple] = {}
        for line in text.splitlines():
            if line.startswith("mtllib"):
                name = str(folder / line.split(maxsplit=1)[1].strip())
                if name in archive.namelist():
                    library.update(_read_mtl(archive.read(name).decode("utf-8", "replace"), archive, folder))
    names = list(library) or ["default"]
    vertices, uvs, faces, face_uvs, face_material = [], [], [], [], []
    material = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            vertices.append([float(v) for v in parts[1:4]])
        elif parts[0] == "vt":
            uvs.append([float(v) for v in parts[1:3]])
        elif parts[0] == "usemtl":
            name = " ".join(parts[1:])
            material = names.index(name) if name in names else 0
        elif parts[0] == "f":
            corners = [c.split("/") for c in parts[1:]]
            v = [int(c[0]) - 1 if int(c[0]) > 0 else len(vertices) + int(c[0]) for c in corners]
            t = [int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in corners]
            t = [len(uvs) + i + 1 if i < -1 else i for i in t]  # negative (relative) UV indices
            for k in range(1, len(corners) - 1):
                faces.append([v[0], v[k], v[k + 1]])
                face_uvs.append([t[0], t[k], t[k + 1]])
                face_material.append(material)
    if not faces:
        raise InputError(f"furniture model '{model}' has no faces")
    points = torch.tensor(vertices, dtype=torch.float32)
    points = torch.stack([points[:, 0], -points[:, 2], points[:, 1]], dim=-1)  # OBJ Y up -> Z up
    low, high = points.min(0).values, points.max(0).values
    points = (points - (low + high) / 2) * (2 * OBJECT_HALF_EXTENT / float((high - low).max()))
    uv_table = torch.cat([torch.tensor(uvs, dtype=torch.float32).reshape(-1, 2), torch.zeros(1, 2)])
    entries = [library.get(name, (torch.full((3,), 0.8), None, 0.5)) for name in names]
    return Mesh(
        triangles=points[torch.tensor(faces)],
        uvs=uv_table[torch.tensor(face_uvs)],  # index -1 reads the appended zero row
        material=torch.tensor(face_material),
        colours=[e[0] for e in entries],
        textures=[e[1] for e in entries],
        roughness=[e[2] for e in entries],
    )


def _surface_samples(mesh: Mesh, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Area-weighted points [N, 3] on the mesh with their linear albedo [N, 3] and roughness [N]."""
    a, b, c = mesh.triangles.unbind(1)
    area = torch.linalg.cross(b - a, c - a, dim=-1).norm(dim=-1)
    face = torch.multinomial(area + 1e-12, count, replacement=True, generator=generator)
    u, v = torch.rand(count, generator=generator), torch.rand(count, generator=generator)
    flip = u + v > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    weights = torch.stack([1 - u - v, u, v], dim=-1)
    points = (mesh.triangles[face] * weights[..., None]).sum(1)
    uv = (mesh.uvs[face] * weights[..., None]).sum(1)
    albedo = torch.zeros(count, 3)
    roughness = torch.zeros(count)
    for index, (colour, texture, rough) in enumerate(zip(mesh.colours, mesh.textures, mesh.roughness, strict=True)):
        mine = mesh.material[face] == index
        roughness[mine] = rough
        if texture is None:
            albedo[mine] = colour
            continue
        height, width = texture.shape[:2]
        wrapped = uv[mine] - uv[mine].floor()
        column = (wrapped[:, 0] * width).long().clamp(0, width - 1)
        row = ((1 - wrapped[:, 1]) * height).long().clamp(0, height - 1)
        albedo[mine] = texture[row, column]
    return points, albedo.clamp(0, 1), roughness


class MeshGridField:
    """A mesh as cell-centred grids of SDF, albedo and roughness (a `SurfaceField` the renderer reads)."""

    def __init__(
        self,
        mesh: Mesh,
        resolution: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        samples: int = SURFACE_SAMPLES,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        samples, albedo, roughness = (t.to(device) for t in _surface_samples(mesh, samples, generator))
        voxels = torch.cartesian_prod(*(torch.arange(resolution),) * 3)
        centres = voxel_centres(voxels, resolution).to(device)
        distance, nearest = [], []
        for chunk in centres.split(8192):
            d, i = torch.cdist(chunk, samples).min(dim=1)
            distance.append(d)
            nearest.append(i)
        distance, nearest = torch.cat(distance), torch.cat(nearest)
        voxel = 2.0 / resolution
        grid = distance.reshape(1, 1, resolution, resolution, resolution)
        band = grid < 0.87 * voxel  # voxels the surface passes through (half a voxel diagonal)
        outside = torch.zeros_like(band)
        outside[..., 0, :, :] = outside[..., -1, :, :] = True
        outside[..., :, 0, :] = outside[..., :, -1, :] = True
        outside[..., :, :, 0] = outside[..., :, :, -1] = True
        outside &= ~band
        while True:  # flood fill from the border, never through the surface band
            grown = F.max_pool3d(outside.float(), 3, stride=1, padding=1).bool() & ~band
            if torch.equal(grown, outside):
                break
            outside = grown
        inside = ~outside & ~band
        # Band voxels next to the inside are inside too; the rest of the band (open sheets) is outside.
        band_inside = band & F.max_pool3d(inside.float(), 3, stride=1, padding=1).bool()
        sign = torch.where(inside | band_inside, -1.0, 1.0)
        sdf = sign * grid - THICKNESS * voxel
        values = torch.cat(
            [sdf.reshape(1, -1), albedo[nearest].T, roughness[nearest][None]], dim=0
        )  # [5, R^3] in x-major voxel order, as read_dense wants
        self.grid = values.reshape(5, resolution, resolution, resolution)
        corners = mesh.triangles.reshape(-1, 3)
        self.bounds = torch.stack([corners.min(0).values, corners.max(0).values])  # for camera placement
        self._beta = torch.tensor(GROUND_TRUTH_BETA, device=device)

    @property
    def beta(self) -> Tensor:
        return self._beta

    def sdf(self, points: Tensor) -> Tensor:
        return read_dense(self.grid[:1], points)[:, 0]

    def __call__(self, points: Tensor) -> FieldSample:
        values = read_dense(self.grid, points)
        return FieldSample(
            sdf=values[:, 0], albedo=values[:, 1:4], roughness=values[:, 4], metallic=torch.zeros_like(values[:, 0])
        )


def devset_models() -> set[str]:
    try:
        return {entry["model"] for entry in json.loads(DEVSET.read_text())["furniture"]}
    except (OSError, KeyError, json.JSONDecodeError):
        return set()


class FurnitureLibrary:
    """The furniture models of the archives in a folder, each converted to a grid field on first use."""

    def __init__(self, folder: Path | None, device: torch.device, resolution: int = 96) -> None:
        folder = Path(folder or FURNITURE_DIR)
        archives = [folder / name for name in ARCHIVES if (folder / name).is_file()]
        if not archives:
            raise InputError(
                f"no furniture archives ({', '.join(ARCHIVES)}) in '{folder}'; install the Debian package "
                "sweethome3d-furniture or pass --furniture-dir with copies of them"
            )
        held_out = devset_models()
        self.models = [
            (archive, name)
            for archive in archives
            for name in sorted(zipfile.ZipFile(archive).namelist())
            if name.lower().endswith(".obj") and name not in held_out
        ]
        self.device, self.resolution = device, resolution
        self.fields: dict[int, MeshGridField] = {}

    def field(self, index: int) -> MeshGridField:
        if index not in self.fields:
            archive, model = self.models[index]
            self.fields[index] = MeshGridField(read_model(archive, model), self.resolution, self.device, index)
        return self.fields[index]

    def viewset(self, seed: int, views: int, resolution: int, bank: EnvironmentBank, options: RenderOptions) -> ViewSet:
        """A seeded model under seeded cameras (around the canonical box) and lighting."""
        rng = np.random.default_rng([seed, 11])
        index = int(rng.integers(len(self.models)))
        field = self.field(index)
        identity = Normalisation(centre=torch.zeros(3), scale=1.0)  # the model already sits in the canonical box
        cameras = sample_cameras(seed, views, resolution, field, identity).to(self.device)
        name = PurePosixPath(self.models[index][1]).stem
        return render_viewset(field, cameras, bank.pick(rng), options, field, f"furniture {name}")

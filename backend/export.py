"""Field to relightable asset: marching cubes, cleanup, simplify, UV atlas, bake, GLB in world space.

This is the one entry point every engine's result and the synthetic ground truth go through.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .bake import bake, uv_atlas
from .cameras import Normalisation
from .errors import InputError
from .field import SurfaceField
from .gltf import write_glb
from .mesh import clean, extract_surface, simplify, with_normals
from .progress import Progress, StageTimer, no_progress

log = logging.getLogger(__name__)

RESOLUTION_RANGE = (32, 1024)
TEXTURE_SIZE_RANGE = (64, 8192)
MIN_TARGET_FACES = 100


def check_export_arguments(out: Path, resolution: int, texture_size: int, target_faces: int) -> None:
    """Reject unusable export settings with one sentence each, before any work is done."""
    low, high = RESOLUTION_RANGE
    if not low <= resolution <= high:
        raise InputError(f"resolution {resolution} is outside {low}..{high}; pick a grid size such as 256 or 512")
    low, high = TEXTURE_SIZE_RANGE
    if not low <= texture_size <= high or texture_size & (texture_size - 1):
        raise InputError(f"texture size {texture_size} is not a power of two in {low}..{high}; use e.g. 1024 or 2048")
    if target_faces != 0 and target_faces < MIN_TARGET_FACES:
        raise InputError(
            f"target face count {target_faces} is too small; use 0 to keep every face or at least {MIN_TARGET_FACES}"
        )
    if out.suffix.lower() != ".glb":
        raise InputError(f"output file '{out}' must end in .glb; rename it, for example to '{out.with_suffix('.glb')}'")
    if out.is_dir():
        raise InputError(f"output path '{out}' is a folder; give a file name ending in .glb")


def export_glb(
    field: SurfaceField,
    out: str | Path,
    normalisation: Normalisation,
    *,
    resolution: int = 256,
    texture_size: int = 1024,
    target_faces: int = 100_000,
    normal_map: bool = False,
    name: str | None = None,
    progress: Progress = no_progress,
    stats: dict[str, float] | None = None,
) -> Path:
    """Export the field's surface as a textured PBR GLB in world space; returns the written path.

    target_faces 0 keeps every marching-cubes face. If `stats` is given, it receives the seconds
    spent in each stage ("<stage> s", also logged at INFO level) and the face counts along the way.
    """
    out = Path(out)
    check_export_arguments(out, resolution, texture_size, target_faces)
    counts: dict[str, int] = {}
    timer = StageTimer()

    def lap(stage: str) -> None:
        timer.lap(stage)
        progress(stage, 1.0)

    mesh = extract_surface(field, resolution, progress=progress)
    if mesh.face_count == 0:
        raise InputError(
            f"the field has no surface inside the box [-1, 1]^3 (its SDF never changes sign on the {resolution}^3 "
            "grid); check the region of interest or the reconstruction that produced the field"
        )
    counts["marching cubes faces"] = mesh.face_count
    lap("marching cubes")
    mesh = clean(mesh)
    counts["clean faces"] = mesh.face_count
    mesh = with_normals(simplify(mesh, target_faces), field)
    counts["final faces"] = mesh.face_count
    lap("cleanup + simplify")
    mesh = uv_atlas(mesh, texture_size)
    lap("uv atlas")
    textures = bake(field, mesh, texture_size, normal_map=normal_map, progress=progress)
    lap("bake")
    # The normalisation is a uniform scale plus a shift: normals and tangent frames carry over unchanged.
    vertices = normalisation.to_world(torch.as_tensor(mesh.vertices, dtype=torch.float64))
    world = replace(mesh, vertices=vertices.numpy().astype(np.float32))
    write_glb(world, textures, out, name=name or out.stem)
    lap("write")
    summary = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in timer.seconds.items())
    log.info("export %s: %s", out.name, summary)
    if stats is not None:
        stats.update({f"{stage} s": seconds for stage, seconds in timer.seconds.items()})
        stats.update(counts)
    return out

"""Presets: what one reconstruction is allowed to spend, by name (DESIGN §4 "Presets").

With a checkpoint, `fast` is the feed-forward model alone and the others refine its field; without
one (none ships yet) every preset runs the refinement engine from the visual hull and `fast` is
simply the shortest refinement. Each preset states its budget and its time per object on one H200 as
`bench/devset_reconstruct.py` measured it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from .errors import InputError
from .refine import LossWeights, RefineConfig

# The GPU presets also fit the mesh's own silhouette (docs/REFINEMENT.md: +2.2 dB PSNR-L and half the Chamfer on
# the fire extinguisher at weight 0.1); the tiny CPU budgets overgrow with it, so `cpu` keeps it off. They keep
# nearby materials alike five times as strongly as the default: on the dev set, standard's refinement relit
# 0.55 dB better with it (docs/REFINEMENT.md 3c).
GPU_WEIGHTS = LossWeights(silhouette=0.1, material=0.05)


@dataclass(frozen=True)
class Preset:
    name: str
    refine: RefineConfig
    resolution: int  # marching-cubes grid per axis
    texture_size: int  # baked texture width and height
    target_faces: int  # simplify to this many faces
    budget: str  # one line: what the preset spends and how long it should take
    engine: str = "both"  # the engine when a checkpoint is given (without one: "refine")


# What every GPU preset shares: those weights, separate shape channels, steps replayed from CUDA graphs.
GPU_REFINE = RefineConfig(weights=GPU_WEIGHTS, geometry_channels=8, cuda_graphs=True)
STANDARD_REFINE = replace(
    GPU_REFINE,
    channels=16,
    dense_resolution=64,
    sparse_resolution=192,
    coarse_steps=800,
    fine_steps=800,
    rays_per_batch=4096,
    samples=48,
    importance_samples=32,
)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        refine=RefineConfig(
            channels=8,
            geometry_channels=4,
            dense_resolution=32,
            sparse_resolution=96,
            hidden=32,
            hull_resolution=48,
            # The pre-fit's rate decays like every stage's; 60 steps then left the demo's geometry rough (Chamfer 0.119
            # against 0.031 at a constant rate), 300 match or beat the constant rate's scores for 2 s more.
            prefit_steps=300,
            prefit_points=2048,
            coarse_steps=300,
            fine_steps=100,
            rays_per_batch=256,
            samples=16,
            importance_samples=16,
            regulariser_points=128,
            psnr_rays=4096,
            # No roughness prior: it saturated every texel at roughness 1; without it the procedural assets' roughness
            # comes within 0.15 of the truth (from 0.45-0.56) and the demo scores the same (docs/REFINEMENT.md 3d).
            weights=LossWeights(roughness_prior=0.0),
        ),
        resolution=96,
        texture_size=256,
        target_faces=10_000,
        budget="refinement 300+300+100 steps of 256 rays, grids 32^3 + 96^3 sparse, 256 px textures, "
        "10k faces; about a minute for 8 views of 48 px on a 2-core CPU",
    ),
    "fast": Preset(
        name="fast",
        refine=replace(
            GPU_REFINE,
            dense_resolution=48,
            sparse_resolution=128,
            coarse_steps=300,
            fine_steps=200,
            rays_per_batch=2048,
        ),
        resolution=192,
        texture_size=1024,
        target_faces=30_000,
        engine="feedforward",
        budget="without a checkpoint the shortest refinement: 150+300+200 steps of 2048 rays, grids 48^3 + "
        "128^3 sparse, replayed from CUDA graphs, 1024 px textures, 30k faces; measured 8-16 s (mean 10 s) per "
        "object, 16 views of 512^2, on one H200 (bench/devset_reconstruct.py; the first object of a process pays "
        "the warm-up); target 15 s",
    ),
    "standard": Preset(
        name="standard",
        refine=STANDARD_REFINE,
        resolution=256,
        texture_size=2048,
        target_faces=100_000,
        budget="refinement 150+800+800 steps of 4096 rays, grids 64^3 + 192^3 sparse, replayed from CUDA graphs, "
        "2048 px textures, 100k faces; measured 32-43 s (mean 36 s) per object, 16 views of 512^2, on one H200 "
        "(bench/devset_reconstruct.py); target at most 60 s",
    ),
    "high": Preset(
        name="high",
        # standard's refinement: more steps, rays or channels relit worse on the dev set (docs/REFINEMENT.md 3c)
        refine=STANDARD_REFINE,
        resolution=384,
        texture_size=4096,
        target_faces=250_000,
        budget="standard's refinement exported finer: 384^3 marching cubes, 4096 px textures, 250k faces; "
        "measured 38-58 s (mean 45 s) per object, 16 views of 512^2, on one H200 (bench/devset_reconstruct.py); "
        "longer, denser or wider refinements relit worse (docs/REFINEMENT.md 3c)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset of that name, or an InputError listing the names there are."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}'; use one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def variant(name: str, settings: Sequence[str]) -> Preset:
    """The preset `name` with RefineConfig fields set from KEY=VALUE strings (`weights.NAME` for a loss weight;
    each value parsed as its field's type, `None` for none): the benchmarks' `--set`. It is registered as
    `name+`, so that `reconstruct` runs, and its records name, exactly these settings. No settings: the preset."""
    preset = get_preset(name)
    if not settings:
        return preset
    config = preset.refine
    changes: dict[str, object] = {}
    weights: dict[str, object] = {}
    for setting in settings:
        key, _, text = setting.partition("=")
        loss = key.startswith("weights.")
        target, holder, field_name = (weights, config.weights, key[8:]) if loss else (changes, config, key)
        if field_name not in {f.name for f in fields(holder)} - {"weights"}:
            raise InputError(f"'{setting}' sets nothing: RefineConfig has no field '{key}'")
        target[field_name] = _parsed(setting, text, getattr(holder, field_name))
    if weights:
        changes["weights"] = replace(config.weights, **weights)
    try:
        changed = replace(preset, name=f"{name}+", refine=replace(config, **changes))
    except ValueError as error:
        raise InputError(f"--set {' '.join(settings)}: {error}") from None
    PRESETS[changed.name] = changed
    return changed


def _parsed(setting: str, text: str, like: object) -> object:
    """text as a value of like's type (a float where the default is None)."""
    if text == "None":
        return None
    try:
        if isinstance(like, bool):
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        return float(text) if like is None or isinstance(like, float) else type(like)(text)
    except (KeyError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(like), type(like).__name__)
        raise InputError(f"'{setting}': '{text}' is not {kind}") from None

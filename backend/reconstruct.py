"""One reconstruction: bundle in, relightable GLB out (DESIGN §3).

load + validate -> drop unusable views (with a warning) -> canonical box -> engine -> field checks
-> export in world space, atomically. Bad input becomes an `InputError` with one sentence before any
file is written; a view that can be left out becomes a warning in the result instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from dataclasses import field as default_field
from pathlib import Path

import torch

from .bundle import Bundle, canonical_normalisation, load_bundle
from .cameras import Cameras, Normalisation, project
from .device import pick_device
from .errors import InputError
from .export import check_export_arguments, export_glb
from .feedforward import load_model, predict
from .field import GridField, SurfaceField
from .presets import Preset, get_preset
from .progress import Progress, StageTimer, no_progress
from .refine import Cancelled, DivergenceError, RefineReport, RefineResult, refine
from .shading import Environment

# feedforward: Engine A alone; refine: Engine B from the visual hull; both: Engine B from Engine A's field.
ENGINES = ("feedforward", "refine", "both")
MIN_VIEWS = 2  # one view cannot place a surface in depth
FEW_VIEWS = 4  # below this the back of the object is guessed: say so
MIN_SURFACE_COVERAGE = 0.5  # a refined surface meeting fewer of the mask's rays than this has collapsed
MASK_THRESHOLD = 0.5  # a pixel at or above this mask value is foreground
# A view "sees the box" when any point of this lattice over the canonical box projects into its image.
BOX_PROBE_POINTS = 9


@dataclass
class ReconstructionResult:
    path: Path  # the GLB written
    timings: dict[str, float]  # seconds per stage, plus "total"
    warnings: list[str]  # one sentence each: what was wrong with the input and what was done about it
    training_psnr: float | None  # dB on the training views (RefineReport.training_psnr); None without refinement
    preset: str
    engine: str
    device: str
    views_used: int
    refine_report: RefineReport | None = None
    export_stats: dict[str, float] = default_field(default_factory=dict)  # face counts along the export path
    field: SurfaceField | None = None  # the reconstructed field, canonical frame (for relighting, previews)
    normalisation: Normalisation | None = None  # world <-> canonical frame of `field`


def reconstruct(
    bundle: Path | str | Bundle,
    out: Path | str,
    *,
    preset: str = "standard",
    engine: str | None = None,
    checkpoint: Path | str | None = None,
    device: torch.device | str = "auto",
    progress: Progress = no_progress,
    should_stop: Callable[[], bool] | None = None,
    texture_size: int | None = None,
    target_faces: int | None = None,
) -> ReconstructionResult:
    """Reconstruct a bundle (folder, transforms.json or a loaded Bundle) into a GLB at `out`, in world space.

    preset: one of backend.presets.PRESETS; engine: one of ENGINES, or None for the preset's engine when a
    checkpoint is given and "refine" otherwise; checkpoint: an LSRM .safetensors file (Engine A);
    device: "auto", "cuda", "mps", "cpu" or a torch.device. progress gets (stage, fraction) for "load",
    "stage 1", "stage 2", "visual hull", "coarse", "fine" and the export stages; should_stop is polled
    every refinement step (raises refine.Cancelled).
    texture_size and target_faces, when given, replace the preset's values (the add-on's settings).
    Raises InputError (one sentence, nothing written) when the input cannot give a surface.
    """
    begin = time.perf_counter()
    out = Path(out)
    chosen = get_preset(preset)
    if engine is None:
        engine = chosen.engine if checkpoint is not None else "refine"
    if texture_size is not None:
        chosen = replace(chosen, texture_size=texture_size)
    if target_faces is not None:
        chosen = replace(chosen, target_faces=target_faces)
    if engine not in ENGINES:
        raise InputError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}.")
    check_export_arguments(out, chosen.resolution, chosen.texture_size, chosen.target_faces)
    device = pick_device(device) if isinstance(device, str) else torch.device(device)
    model = load_model(checkpoint, device) if engine != "refine" else None  # a bad checkpoint fails before any work
    timer = StageTimer()
    timings, lap = timer.seconds, timer.lap

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(Path(bundle))
    progress("load", 1.0)
    lap("load")

    warnings: list[str] = []
    bundle = _views_with_foreground(bundle, warnings)
    normalisation = canonical_normalisation(bundle)
    cameras = normalisation.cameras_to_canonical(bundle.cameras)
    keep = _views_seeing_the_box(cameras, bundle.names, warnings)
    bundle = _select(bundle, keep)
    cameras = cameras[keep]
    if len(keep) < FEW_VIEWS:
        warnings.append(
            f"only {len(keep)} usable views; the unseen sides of the object are guessed, so capture "
            f"{FEW_VIEWS} or more around it for a better result."
        )
    environment = None
    if bundle.environment is not None:
        spec = bundle.environment
        environment = Environment.load(spec.path, spec.rotation_z, spec.strength, device)
    lap("validate")

    field: SurfaceField | None = None
    refine_report = None
    if model is not None:
        field = predict(model, cameras.to(device), bundle.images, bundle.masks, environment, progress)
        lap("feed-forward")
    if engine != "feedforward":
        result, attempts = _refine_with_one_retry(
            cameras.to(device), bundle, chosen, environment, field, progress, should_stop
        )
        if attempts > 1:
            warnings.append("the first refinement collapsed (its surface missed the masks); a second seed was used.")
        timings.update({stage: report.seconds for stage, report in result.report.stages.items()})
        field, refine_report = result.field, result.report
    if should_stop is not None and should_stop():
        raise Cancelled("reconstruction cancelled before export")
    stats: dict[str, float] = {}
    export_glb(
        field,
        out,
        normalisation,
        resolution=chosen.resolution,
        texture_size=chosen.texture_size,
        target_faces=chosen.target_faces,
        name=bundle.root.name or "reconstruction",
        progress=progress,
        stats=stats,
    )
    timings.update({key.removesuffix(" s"): value for key, value in stats.items() if key.endswith(" s")})
    timings["total"] = time.perf_counter() - begin
    return ReconstructionResult(
        path=out,
        timings=timings,
        warnings=warnings,
        training_psnr=refine_report.training_psnr if refine_report is not None else None,
        preset=chosen.name,
        engine=engine,
        device=str(device),
        views_used=len(keep),
        refine_report=refine_report,
        export_stats={key: value for key, value in stats.items() if not key.endswith(" s")},
        field=field,
        normalisation=normalisation,
    )


def _refine_with_one_retry(
    cameras: Cameras,
    bundle: Bundle,
    chosen: Preset,
    environment: Environment | None,
    field: SurfaceField | None,
    progress: Progress,
    should_stop: Callable[[], bool] | None,
) -> tuple[RefineResult, int]:
    """Engine B from the given start, and the attempts it took: once more with the next seed when the surface
    misses the masks, and an InputError when that one misses them too. GPU refinements are not bit-reproducible;
    one of 18 H200 dev-set runs collapsed to a 20-face surface, and the same asset and preset ran normally when
    repeated (docs/REFINEMENT.md)."""
    config = chosen.refine
    for attempt in range(2):
        try:
            result = refine(
                cameras,
                bundle.images,
                bundle.masks,
                replace(config, seed=config.seed + attempt),
                environment=environment,
                start=field.to_feature_field() if isinstance(field, GridField) else None,
                progress=progress,
                should_stop=should_stop,
            )
        except DivergenceError as error:
            raise InputError(
                f"the reconstruction diverged ({error}); check that the masks and camera poses match the images."
            ) from None
        if result.report.surface_coverage >= MIN_SURFACE_COVERAGE:
            return result, attempt + 1
    raise InputError(
        f"the reconstructed surface covers only {result.report.surface_coverage:.0%} of the masks, twice; "
        "check that the masks and camera poses match the images, or try another preset."
    )


def _select(bundle: Bundle, views: list[int]) -> Bundle:
    """The bundle restricted to some views (ground-truth buffers included)."""
    return replace(
        bundle,
        names=[bundle.names[v] for v in views],
        cameras=bundle.cameras[views],
        images=bundle.images[views],
        masks=bundle.masks[views],
        ground_truth={key: value[views] for key, value in bundle.ground_truth.items()},
    )


def _views_with_foreground(bundle: Bundle, warnings: list[str]) -> Bundle:
    """Drop views whose mask is empty (with a warning): they would carve the whole object away."""
    if len(bundle.names) < MIN_VIEWS:
        raise InputError(
            f"the bundle has {len(bundle.names)} view; a surface needs at least {MIN_VIEWS} views from different "
            "directions, so capture more views around the object."
        )
    foreground = (bundle.masks >= MASK_THRESHOLD).flatten(1).any(1)
    if not foreground.any():
        raise InputError(
            "every view's mask is empty (no pixel has alpha >= 0.5), so there is no object to reconstruct; "
            "render the views with a transparent background or give masks."
        )
    empty = [name for name, seen in zip(bundle.names, foreground.tolist(), strict=True) if not seen]
    keep = foreground.nonzero()[:, 0].tolist()
    if len(keep) < MIN_VIEWS:
        raise InputError(
            f"only view '{bundle.names[keep[0]]}' shows the object (the other masks are empty); a surface needs at "
            f"least {MIN_VIEWS} views that see it."
        )
    if empty:
        warnings.append(f"left out {len(empty)} views with an empty mask ({', '.join(empty)}); check those images.")
    return _select(bundle, keep)


def _views_seeing_the_box(cameras: Cameras, names: list[str], warnings: list[str]) -> list[int]:
    """Indices of the canonical-frame cameras that see some of the box; the others are dropped with a warning."""
    axis = torch.linspace(-1.0, 1.0, BOX_PROBE_POINTS)
    lattice = torch.cartesian_prod(axis, axis, axis).to(cameras.c2w)
    uv, depth = project(cameras, lattice)
    inside = (depth > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < cameras.width)
    inside &= (uv[..., 1] >= 0) & (uv[..., 1] < cameras.height)
    sees = inside.any(1).tolist()
    keep = [view for view, seen in enumerate(sees) if seen]
    if len(keep) < MIN_VIEWS:
        raise InputError(
            f"{len(keep)} of {len(names)} cameras look at the region to reconstruct; fix the camera poses or the "
            "bundle's 'aabb' so that at least two cameras see the object."
        )
    if len(keep) < len(names):
        missed = [names[view] for view, seen in enumerate(sees) if not seen]
        warnings.append(f"left out {len(missed)} views whose cameras miss the object ({', '.join(missed)}).")
    return keep

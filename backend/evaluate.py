"""`python -m backend evaluate`: relighting quality of a preset (or checkpoint) on assets (DESIGN §9).

Per asset (GLB/glTF, or OBJ with its MTL), in three phases that can run on different machines:
1. inputs (headless Blender): import it into an empty scene; place input cameras on a sphere around
   its bounds and render RGBA views with Cycles under the input environment into a bundle
   (transforms.json with the environment as known lighting and the bounds as `aabb`), the way the
   add-on captures; render held-out test views from other cameras (other azimuths and elevations)
   under a *different* environment: the ground truth relit, linear EXR; sample its surface.
   DIR/<name>/ keeps bundle/, test/gt/, prepared.json and ground_truth.npz; DIR/inputs.json the
   names and render settings.
2. reconstruct (no Blender, the GPU's part): backend.reconstruct on DIR/<name>/bundle, timed, with
   the peak GPU memory (`reconstruct_prepared`; bench/devset_reconstruct.py runs it over presets).
3. score (headless Blender): import each GLB into a fresh scene, render the same test views under
   the test environment, score PSNR-H, PSNR-L and SSIM inside the ground-truth mask
   (backend.metrics), and Chamfer distance and normal error between surface samples of both
   meshes, mapped into the bundle's canonical box (so numbers compare across assets of any size).
   Writes metrics.json (per asset, the mean, timings, GPU memory) and sheet.png (a row per asset:
   input view | ours relit | ground truth relit, sRGB).
`evaluate` runs all three in one process: DIR/<name>/reconstruction.glb, DIR/metrics.json, DIR/sheet.png.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image

from . import blender_render as blender
from .atomic import atomic_directory, atomic_file
from .bundle import canonical_normalisation, load_bundle
from .colour import linear_to_srgb
from .device import pick_device
from .errors import InputError
from .exr import read_exr_rgba
from .metrics import MetricsConfig, geometry_metrics, image_metrics
from .progress import Progress, StageTimer, no_progress
from .shading import builtin_environment
from .sheet import write_sheet

METRIC_KEYS = ("psnr_h", "psnr_l", "ssim", "chamfer", "normal_error_deg")
SHEET_COLUMNS = ("input view", "ours relit", "ground truth relit")
RESOLUTION_RANGE = (16, 4096)
INPUTS_INDEX = "inputs.json"  # DIR/inputs.json: the asset names and render settings of the inputs phase
PREPARED = "prepared.json"  # DIR/<name>/prepared.json: the asset, its camera sphere, the render times
GROUND_TRUTH = "ground_truth.npz"  # DIR/<name>/: first input view (sheet), surface points and normals
RECONSTRUCTION_SETTINGS = ("preset", "engine", "checkpoint", "device", "metrics")  # not shared by the phases
METRIC_NOTES = {
    "psnr_h": "dB, linear HDR, peak = brightest ground-truth value in the mask",
    "psnr_l": "dB, clipped to [0, 1] and sRGB-encoded, peak 1",
    "ssim": "Gaussian 11x11 sigma 1.5 on the sRGB images, averaged inside the mask",
    "chamfer": "canonical box units ([-1, 1]^3), mean of both directions",
    "normal_error_deg": "degrees between normals of nearest surface samples, both directions",
}


@dataclass(frozen=True)
class EvaluateConfig:
    preset: str = "standard"
    engine: str | None = None  # None: the preset's engine with a checkpoint, else refine (see reconstruct)
    checkpoint: str | None = None  # an LSRM .safetensors file for the feed-forward engine
    device: str = "auto"
    views: int = 16  # input views rendered into the bundle
    test_views: int = 4  # held-out views scored under the test environment
    resolution: int = 256  # pixels, square, for input and test views alike
    samples: int = 32  # Cycles samples per pixel
    input_environment: str = "studio"  # built-in environment names (backend.shading.BUILTIN_ENVIRONMENTS)
    test_environment: str = "forest"
    seed: int = 0  # turns the camera rings, seeds Cycles and the surface sampling
    # Cameras: a 50 mm lens; the asset's bounding sphere fills this share of the view's half-width.
    lens: float = 50.0
    sensor_width: float = 36.0  # Blender's default sensor, which sphere_cameras keeps
    frame_fill: float = 0.95
    input_elevation: tuple[float, float] = (-10.0, 60.0)  # degrees above the horizon
    test_elevation: tuple[float, float] = (5.0, 40.0)  # a different band, so no test view repeats an input
    test_azimuth_shift: float = 45.0  # degrees between the input and the test camera rings
    environment_strength: float = 1.0
    # Geometry: surface samples per mesh for Chamfer distance and normal error.
    surface_samples: int = 10_000
    sheet_background: float = 0.18  # linear grey behind the objects on the sheet (sRGB ~0.46)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def check_config(config: EvaluateConfig) -> None:
    """Reject unusable settings with one sentence each, before any rendering."""
    from .presets import get_preset
    from .reconstruct import ENGINES, MIN_VIEWS

    get_preset(config.preset)
    if config.engine is not None and config.engine not in ENGINES:
        raise InputError(f"unknown engine '{config.engine}'; use one of {', '.join(ENGINES)}")
    if config.views < MIN_VIEWS:
        raise InputError(f"--views {config.views} is too few; reconstruction needs at least {MIN_VIEWS} input views")
    if config.test_views < 1:
        raise InputError(f"--test-views {config.test_views} leaves nothing to score; use at least 1")
    low, high = RESOLUTION_RANGE
    if not low <= config.resolution <= high:
        raise InputError(f"--res {config.resolution} is outside {low}..{high}; use e.g. 256")
    if config.samples < 1:
        raise InputError(f"--samples {config.samples} must be at least 1; use e.g. 32")
    builtin_environment(config.input_environment)
    builtin_environment(config.test_environment)


def evaluate(
    assets: list[Path], out: Path, config: EvaluateConfig = EvaluateConfig(), progress: Progress = no_progress
) -> dict:
    """Evaluate every asset; write out/metrics.json and out/sheet.png; return the metrics dictionary.

    The three phases in one process: prepare_inputs, reconstruct_prepared per asset, score.
    """
    names = prepare_inputs(assets, out, config, progress)
    out = Path(out)
    records = {}
    for name in names:
        records[name] = reconstruct_prepared(
            out / name, out / name / "reconstruction.glb", config, _prefixed(progress, name)
        )
    return score(out, out, records, progress, config.metrics)


# ----------------------------------------------------------------------------- phase 1: inputs (bpy)


def prepare_inputs(
    assets: list[Path], out: Path, config: EvaluateConfig = EvaluateConfig(), progress: Progress = no_progress
) -> list[str]:
    """Render every asset's input bundle, relit test views and surface samples into out/<name>/; return the names.

    out/inputs.json records the names prepared so far and the render settings, which the score phase reuses.
    """
    if not assets:
        raise InputError("no asset given; name at least one .glb, .gltf or .obj file")
    assets = [blender.check_asset(Path(asset)) for asset in assets]
    check_config(config)
    blender.require_bpy()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; give a folder to write the results into")
    names = _unique_names(assets)
    for done, (name, asset) in enumerate(zip(names, assets, strict=True), start=1):
        prepare_asset(asset, out / name, config, _prefixed(progress, name))
        write_inputs_index(out, names[:done], config)  # after each asset: an interrupted run keeps what it made
    return names


def write_inputs_index(out: Path, names: list[str], config: EvaluateConfig) -> None:
    """out/inputs.json: the prepared assets' names and the render settings the score phase must reuse."""
    index = {"assets": names, "settings": render_settings(config)}
    with atomic_file(Path(out) / INPUTS_INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")


def render_settings(config: EvaluateConfig) -> dict:
    """The settings the inputs and score phases must share (everything but the reconstruction's own)."""
    return {key: value for key, value in asdict(config).items() if key not in RECONSTRUCTION_SETTINGS}


def prepare_asset(asset: Path, folder: Path, config: EvaluateConfig, progress: Progress) -> None:
    """Render one asset's bundle (input lighting) and ground truth (test lighting) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    blender.empty_scene()
    objects = blender.import_asset(asset)
    bounds = blender.world_bounds(objects)
    centre, radius = blender.bounding_sphere(bounds)
    if not radius > 0.0:
        raise InputError(f"asset '{asset}' is a single point (its bounds have no size); give a real surface")
    scene = blender.use_cycles(config.resolution, config.resolution, config.samples, seed=config.seed, persistent=True)
    rings = CameraRings(centre, radius, config)
    first_input = render_input_bundle(folder / "bundle", scene, bounds, rings, config, progress)
    timer.lap("render inputs")
    _render_test_views(folder / "test" / "gt", rings, config, progress, "render test")
    points, normals = blender.sample_surface(objects, config.surface_samples, config.seed)
    blender.empty_scene()  # free the scene's images and meshes
    timer.lap("render test")
    np.savez_compressed(folder / GROUND_TRUTH, first_input=first_input, points=points, normals=normals)
    record = {"asset": str(asset.resolve()), "centre": centre, "radius": radius, "timings": timer.seconds}
    with atomic_file(folder / PREPARED) as tmp:
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------- phase 2: reconstruct (no bpy)


def reconstruction_settings(config: EvaluateConfig) -> dict:
    """What decides a reconstruction besides the bundle and the code: the preset's budgets (not its prose), the
    engine and the checkpoint, as plain JSON. A record made under other settings is not a result of these."""
    from .presets import get_preset

    preset = asdict(get_preset(config.preset))
    del preset["budget"]
    settings = {"preset": preset, "engine": config.engine, "checkpoint": config.checkpoint and str(config.checkpoint)}
    return json.loads(json.dumps(settings))


def reconstruct_prepared(folder: Path, glb: Path, config: EvaluateConfig, progress: Progress = no_progress) -> dict:
    """Reconstruct folder/bundle into glb with the config's preset; return the record the score phase reads.

    Imports no bpy, so it runs on a GPU machine without Blender (bench/devset_reconstruct.py).
    """
    from .reconstruct import reconstruct

    device = pick_device(config.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = time.perf_counter()
    result = reconstruct(
        Path(folder) / "bundle",
        glb,
        preset=config.preset,
        engine=config.engine,
        checkpoint=config.checkpoint,
        device=device,
        progress=progress,
    )
    seconds = time.perf_counter() - clock
    return {
        "glb": str(result.path),
        "preset": config.preset,
        "engine": result.engine,
        "checkpoint": config.checkpoint and str(config.checkpoint),
        "device": result.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "seconds": seconds,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "timings": result.timings,
        "training_psnr": result.training_psnr,
        "views_used": result.views_used,
        "export": result.export_stats,
        "warnings": list(result.warnings),
        "settings": reconstruction_settings(config),
    }


def load_reconstructions(folder: Path, names: list[str]) -> dict[str, dict]:
    """The records bench/devset_reconstruct.py wrote (folder/<name>.json beside folder/<name>.glb), by name.

    An asset whose reconstruction failed or is missing gets a record with its "error" instead.
    """
    records = {}
    for name in names:
        path, glb = folder / f"{name}.json", folder / f"{name}.glb"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"error": f"no {path.name}"}
        if "error" not in record and not glb.is_file():
            record = {**record, "error": f"no {glb.name}"}
        records[name] = {**record, "glb": str(glb)}  # where it is here, not where it was written
    return records


# ----------------------------------------------------------------------------- phase 3: score (bpy)


def score(
    prepared: Path,
    out: Path,
    records: dict[str, dict] | None = None,
    progress: Progress = no_progress,
    metrics: MetricsConfig | None = None,
) -> dict:
    """Render each reconstruction under the test lighting, score it against prepared/<name>/, write the report.

    records: reconstruction records by asset name (reconstruct_prepared's); None reads them from out
    (load_reconstructions). Writes out/metrics.json and out/sheet.png; the renders go to out/<name>/test/ours.
    Assets whose reconstruction failed are listed under "failed"; the rest are scored.
    """
    blender.require_bpy()
    prepared, out = Path(prepared), Path(out)
    index_path = prepared / INPUTS_INDEX
    if not index_path.is_file():
        raise InputError(f"'{prepared}' holds no {INPUTS_INDEX}; run `evaluate ... --phase inputs --out {prepared}`")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    settings = index["settings"]
    for key in ("input_elevation", "test_elevation"):
        settings[key] = tuple(settings[key])
    config = EvaluateConfig(**settings, metrics=metrics or MetricsConfig())
    records = load_reconstructions(out, index["assets"]) if records is None else records

    results, rows, failed = {}, [], {}
    for name in index["assets"]:
        record = records.get(name, {"error": "not reconstructed"})
        if "error" in record:
            failed[name] = record["error"]
            continue
        result, row = score_asset(prepared / name, record, out / name, config, _prefixed(progress, name))
        results[name] = result
        rows.append(row)
    if not results:
        raise InputError(f"no reconstruction to score in '{out}' ({failed}); run the reconstruct phase first")
    first = next(records[name] for name in results)
    report = {
        "settings": {**settings, **{key: first.get(key) for key in RECONSTRUCTION_SETTINGS if key != "metrics"}},
        "metric_notes": METRIC_NOTES,
        "assets": results,
        "failed": failed,
        "mean": _mean(list(results.values())),
        "sheet_columns": list(SHEET_COLUMNS),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(_json_safe(report), indent=2), encoding="utf-8")
    write_sheet(out / "sheet.png", rows, config.sheet_background)
    return report


def score_asset(
    folder: Path, record: dict, out: Path, config: EvaluateConfig, progress: Progress
) -> tuple[dict, np.ndarray]:
    """Render record["glb"] from folder's test cameras and score it; return its metrics and sheet row (linear RGBA)."""
    prepared = json.loads((folder / PREPARED).read_text(encoding="utf-8"))
    truth = np.load(folder / GROUND_TRUTH)
    ground_truth = [
        read_exr_rgba(path, "the ground-truth render") for path in sorted((folder / "test" / "gt").glob("*.exr"))
    ]
    rings = CameraRings(tuple(prepared["centre"]), prepared["radius"], config)
    timings = {**prepared["timings"], "reconstruct": record["seconds"]}
    timer = StageTimer()

    # Ours: the reconstruction alone in a fresh scene, under the test lighting, from the same cameras.
    blender.empty_scene()
    ours_objects = blender.import_asset(Path(record["glb"]))
    blender.use_cycles(config.resolution, config.resolution, config.samples, seed=config.seed, persistent=True)
    ours = _render_test_views(out / "test" / "ours", rings, config, progress, "render ours")
    ours_points, ours_normals = blender.sample_surface(ours_objects, config.surface_samples, config.seed)
    blender.empty_scene()  # free the scene's images and meshes
    timer.lap("render test")

    per_view = []
    for index, (prediction, target) in enumerate(zip(ours, ground_truth, strict=True)):
        mask = torch.from_numpy(target[..., 3])
        if not (mask >= config.metrics.mask_threshold).any():
            continue  # the object left this test view entirely: nothing to score
        scores = image_metrics(
            torch.from_numpy(prediction[..., :3]), torch.from_numpy(target[..., :3]), mask, config.metrics
        )
        per_view.append({"view": index, **scores})
        progress("score", (index + 1) / len(ours))
    if not per_view:
        raise InputError(f"asset '{prepared['asset']}' is invisible in every test view; check its geometry and scale")
    normalisation = canonical_normalisation(load_bundle(folder / "bundle"))
    geometry = geometry_metrics(
        normalisation.to_canonical(torch.from_numpy(ours_points)),
        torch.from_numpy(ours_normals),
        normalisation.to_canonical(torch.from_numpy(truth["points"])),
        torch.from_numpy(truth["normals"]),
        config.metrics,
    )
    progress("score", 1.0)
    timer.lap("score")
    timings["render test"] += timer.seconds["render test"]
    timings["score"] = timer.seconds["score"]

    metrics = {key: float(np.mean([view[key] for view in per_view])) for key in ("psnr_h", "psnr_l", "ssim")}
    metrics.update(geometry)
    row = [truth["first_input"], ours[0], ground_truth[0]]
    warnings = list(record["warnings"])
    if config.input_environment == config.test_environment:
        warnings.append("the test environment is the input one, so these numbers measure novel views, not relighting")
    result = {
        "asset": prepared["asset"],
        **metrics,
        "per_view": per_view,
        "timings": {f"{stage} s": seconds for stage, seconds in timings.items()},
        "reconstruction": {key: value for key, value in record.items() if key != "warnings"},
        "warnings": warnings,
    }
    return result, row


class CameraRings:
    """Input and test cameras around the asset's bounding sphere; the same in every scene."""

    def __init__(self, centre: tuple[float, float, float], radius: float, config: EvaluateConfig) -> None:
        # Square images: the sensor width spans the view, so the half-angle is atan(sensor / 2 / lens).
        half_angle = math.atan(config.frame_fill * config.sensor_width / (2.0 * config.lens))
        self.centre, self.distance, self.config = centre, radius / math.sin(half_angle), config
        self.azimuth = float(np.random.default_rng(config.seed).uniform(0.0, 360.0))

    def place(self, test: bool) -> list:
        from blender_addon.capture import sphere_cameras

        config = self.config
        return sphere_cameras(
            self.centre,
            self.distance,
            config.test_views if test else config.views,
            config.test_elevation if test else config.input_elevation,
            config.lens,
            azimuth_offset=self.azimuth + (config.test_azimuth_shift if test else 0.0),
            name="Test" if test else "Input",
        )


def render_input_bundle(
    bundle: Path, scene, bounds: np.ndarray, rings: CameraRings, config: EvaluateConfig, progress: Progress
) -> np.ndarray:
    """Render the input views into a bundle folder (all-or-nothing); return the first view, linear RGBA."""
    from blender_addon.capture import camera_frame, write_transforms

    bpy = blender.require_bpy()
    environment = builtin_environment(config.input_environment)
    blender.set_world_environment(environment, strength=config.environment_strength)
    cameras = rings.place(test=False)
    bpy.context.view_layer.update()
    frames, first = [], None
    with atomic_directory(bundle) as tmp, tempfile.TemporaryDirectory(prefix="lsrm-eval-") as scratch:
        (tmp / "images").mkdir()
        for index, camera in enumerate(cameras):
            scene.camera = camera
            rgba = blender.render_linear_rgba(Path(scratch) / f"{index:04d}.exr")
            first = rgba if first is None else first
            name = f"images/{index:04d}.png"
            write_rgba_png(rgba, tmp / name)
            frames.append({"file_path": name, **camera_frame(camera, scene)})
            progress("render inputs", (index + 1) / len(cameras))
        shutil.copyfile(environment, tmp / environment.name)
        lighting = {"file_path": environment.name, "rotation_z": 0.0, "strength": config.environment_strength}
        write_transforms(tmp, frames, aabb=bounds.tolist(), environment=lighting)
    for camera in cameras:
        bpy.data.objects.remove(camera)
    return first


def _render_test_views(
    folder: Path, rings: CameraRings, config: EvaluateConfig, progress: Progress, stage: str
) -> list[np.ndarray]:
    """Render the test cameras under the test environment to linear EXRs in folder; return RGBA [H, W, 4] each."""
    bpy = blender.require_bpy()
    blender.set_world_environment(builtin_environment(config.test_environment), strength=config.environment_strength)
    cameras = rings.place(test=True)
    bpy.context.view_layer.update()
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index, camera in enumerate(cameras):
        bpy.context.scene.camera = camera
        images.append(blender.render_linear_rgba(folder / f"{index:04d}.exr"))
        progress(stage, (index + 1) / len(cameras))
    return images


def write_rgba_png(rgba: np.ndarray, path: Path) -> None:
    """A bundle image: straight (un-premultiplied) colour, sRGB-encoded, with alpha as the mask."""
    pixels = torch.from_numpy(rgba)
    alpha = pixels[..., 3:].clamp(0.0, 1.0)
    straight = torch.where(alpha > 0.0, pixels[..., :3] / alpha.clamp_min(1e-8), torch.zeros_like(pixels[..., :3]))
    encoded = torch.cat([linear_to_srgb(straight), alpha], dim=-1)
    Image.fromarray((encoded * 255.0 + 0.5).to(torch.uint8).numpy(), "RGBA").save(path)


def _prefixed(progress: Progress, name: str) -> Progress:
    return lambda stage, fraction: progress(f"{name}: {stage}", fraction)


def _unique_names(assets: list[Path]) -> list[str]:
    """Folder names per asset: the file stem, numbered when two assets share one."""
    names: list[str] = []
    for asset in assets:
        name, count = asset.stem, 1
        while name in names:
            count += 1
            name = f"{asset.stem}_{count}"
        names.append(name)
    return names


def _mean(records: list[dict]) -> dict[str, float]:
    """Mean of each metric and each timing over the assets; the largest peak GPU memory (None on the CPU)."""
    mean = {key: float(np.mean([record[key] for record in records])) for key in METRIC_KEYS}
    for stage in records[0]["timings"]:
        mean[stage] = float(np.mean([record["timings"][stage] for record in records]))
    peaks = [record["reconstruction"]["peak_gpu_memory_bytes"] for record in records]
    mean["peak_gpu_memory_bytes"] = None if None in peaks else max(peaks)
    return mean


def _json_safe(value):
    """JSON has no infinity (PSNR of identical images): write those as null; paths as strings."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

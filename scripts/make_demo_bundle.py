"""Regenerate the committed demo data under demo/ from a real textured model, with headless Blender.

    python scripts/make_demo_bundle.py [--out demo]

Needs the bpy module (`make setup-test`) and the Debian package sweethome3d-furniture. Renders the
CC0 model named in DemoConfig (from bench/devset.json) with Cycles on the CPU, exactly as
`python -m backend evaluate` renders an asset (same camera rings, same bundle writer):
- demo/input/: the bundle to reconstruct: transforms.json (cameras from blender_addon.capture,
  `aabb` = the model's bounds, the input world as known lighting, copied in), RGBA sRGB PNGs;
- demo/test/: held-out cameras under a *different* world, the relit ground truth: transforms.json
  (with the test world), RGBA sRGB PNGs that load_bundle reads, and per frame `hdr_path`, the same
  render as linear half-float EXR (premultiplied alpha, as Blender writes it) for PSNR-H;
  gt_surface.npy: float32 [N, 6], area-weighted surface points and outward face normals (world).
- demo/CREDITS.md: the model's and the worlds' credits.
Cycles is seeded and every writer is byte-stable, so a re-run reproduces the files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import OpenEXR

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

from backend import blender_render as blender  # noqa: E402
from backend.atomic import atomic_directory, atomic_file  # noqa: E402
from backend.errors import InputError  # noqa: E402
from backend.evaluate import CameraRings, EvaluateConfig, render_input_bundle, write_rgba_png  # noqa: E402
from backend.progress import Progress, TerminalProgress  # noqa: E402
from backend.shading import ENVIRONMENTS_DIR, builtin_environment  # noqa: E402
from scripts.build_devset import extract_model, furniture_archive, load_spec  # noqa: E402

DEFAULT_OUT = REPO / "demo"
GT_SURFACE = "gt_surface.npy"


@dataclass(frozen=True)
class DemoConfig:
    model: str = "barrel"  # a furniture name in bench/devset.json; must be CC0
    scale: float = 0.01  # SweetHome3D models are in centimetres; the demo object is in metres
    # Views, resolution, lighting and camera rings go through evaluate's own code, so the demo scores
    # like it; every value that shapes the images is pinned here, so a re-run reproduces the files.
    render: EvaluateConfig = field(
        default_factory=lambda: EvaluateConfig(
            views=16,
            test_views=4,
            resolution=256,
            samples=64,
            input_environment="studio",
            test_environment="forest",
            seed=0,
            lens=50.0,
            sensor_width=36.0,
            frame_fill=0.95,
            input_elevation=(-10.0, 60.0),
            test_elevation=(5.0, 40.0),
            test_azimuth_shift=45.0,
            environment_strength=1.0,
        )
    )
    test_samples: int = 256  # more samples for the ground truth, so its noise does not cap PSNR
    surface_samples: int = 8192  # ground-truth surface points for Chamfer distance and normal error


def make_demo(out: Path = DEFAULT_OUT, config: DemoConfig = DemoConfig(), progress: Progress | None = None) -> Path:
    """Render demo/input, demo/test and demo/CREDITS.md for the configured model; return `out`."""
    progress = progress or TerminalProgress()
    spec = load_spec()
    model = next((entry for entry in spec["furniture"] if entry["name"] == config.model), None)
    if model is None or model["licence"] != "CC0-1.0":
        raise InputError(f"demo model '{config.model}' is not a CC0 furniture entry of bench/devset.json; pick one.")
    archive = furniture_archive(spec, model["archive"])
    out = Path(out)
    bpy = blender.require_bpy()
    with tempfile.TemporaryDirectory(prefix="lsrm-demo-") as scratch:
        scratch = Path(scratch)
        obj = extract_model(archive, model["model"], scratch / "model")

        blender.empty_scene()
        objects = blender.import_asset(obj)
        for item in objects:
            item.matrix_world = _scale_matrix(config.scale) @ item.matrix_world
        bpy.context.view_layer.update()
        bounds = blender.world_bounds(objects)
        centre, radius = blender.bounding_sphere(bounds)
        render = config.render
        scene = blender.use_cycles(render.resolution, render.resolution, render.samples, seed=render.seed)
        rings = CameraRings(centre, radius, render)

        render_input_bundle(out / "input", scene, bounds, rings, render, progress)
        scene.cycles.samples = config.test_samples
        points, normals = blender.sample_surface(objects, config.surface_samples, render.seed)
        _render_test_bundle(out / "test", scene, bounds, rings, render, np.hstack([points, normals]), progress)
    _write_credits(out / "CREDITS.md", model, config)
    return out


def _scale_matrix(scale: float):
    from mathutils import Matrix

    return Matrix.Scale(scale, 4)


def _render_test_bundle(
    folder: Path, scene, bounds: np.ndarray, rings: CameraRings, render: EvaluateConfig, surface: np.ndarray, progress
) -> None:
    """The held-out views under the test world: PNG + linear EXR per camera, transforms.json, GT surface."""
    from blender_addon.capture import camera_frame, write_transforms

    bpy = blender.require_bpy()
    environment = builtin_environment(render.test_environment)
    blender.set_world_environment(environment, strength=render.environment_strength)
    cameras = rings.place(test=True)
    bpy.context.view_layer.update()
    frames = []
    with atomic_directory(folder) as tmp, tempfile.TemporaryDirectory(prefix="lsrm-demo-") as scratch:
        (tmp / "images").mkdir()
        (tmp / "hdr").mkdir()
        for index, camera in enumerate(cameras):
            scene.camera = camera
            rgba = blender.render_linear_rgba(Path(scratch) / f"{index:04d}.exr")
            image, hdr = f"images/{index:04d}.png", f"hdr/{index:04d}.exr"
            write_rgba_png(rgba, tmp / image)
            _write_half_exr(rgba, tmp / hdr)
            frames.append({"file_path": image, "hdr_path": hdr, **camera_frame(camera, scene)})
            progress("render test", (index + 1) / len(cameras))
        shutil.copyfile(environment, tmp / environment.name)
        lighting = {"file_path": environment.name, "rotation_z": 0.0, "strength": render.environment_strength}
        write_transforms(tmp, frames, aabb=bounds.tolist(), environment=lighting)
        np.save(tmp / GT_SURFACE, surface.astype(np.float32))


def _write_half_exr(rgba: np.ndarray, path: Path) -> None:
    """Linear RGBA as half floats: about 3 significant digits, ample for PSNR-H, half the bytes of float32."""
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {"RGBA": np.ascontiguousarray(rgba.astype(np.float16))}).write(str(path))


def _write_credits(path: Path, model: dict, config: DemoConfig) -> None:
    render = config.render
    text = f"""# Credits for the demo data

The views in `input/` and `test/` are Cycles renders of one third-party model and two Blender
studio worlds, made by `scripts/make_demo_bundle.py`. The model itself is not shipped.

## Model: "{model["title"]}" by {model["author"]}

- Licence: {model["licence"]} (Creative Commons Zero, public domain dedication), as stated in its
  licence file and in the Debian package `sweethome3d-furniture` (`{model["archive"]}`, `{model["model"]}`).
- Source: {model["source"]}, cleaned and converted to OBJ by Emmanuel Puybaret (eTeks) for Sweet Home 3D.
- Rendered at {config.scale:g} scale (centimetres to metres); otherwise unmodified.

## Lighting: Blender studio worlds `{render.input_environment}` (input) and `{render.test_environment}` (test)

Copied into the bundles unchanged from `{ENVIRONMENTS_DIR.relative_to(REPO).as_posix()}/`; CC0, by Greg Zaal
(Poly Haven), shipped with Blender. Details: `{(ENVIRONMENTS_DIR / "CREDITS.md").relative_to(REPO).as_posix()}`.
"""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default demo/)")
    args = parser.parse_args(argv)
    try:
        out = make_demo(args.out)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"{out}: input/, test/ and CREDITS.md, {size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

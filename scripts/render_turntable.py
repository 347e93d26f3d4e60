"""A turntable of a reconstructed asset relit under several worlds: one animated GIF for the README.

    python scripts/render_turntable.py out/demo/barrel.glb --out docs/addon/turntable.gif
        [--worlds courtyard sunset] [--frames 16] [--size 176] [--samples 24]

Needs the bpy module. The GLB goes through Blender's glTF importer (as the add-on imports it) and
is rendered with Cycles on the CPU under each studio world in turn, the camera orbiting it; each
frame shows the worlds side by side (premultiplied linear renders over grey, tone-mapped like
the demo's comparison sheet).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

from backend import blender_render as blender  # noqa: E402
from backend.atomic import atomic_file  # noqa: E402
from backend.shading import builtin_environment  # noqa: E402
from backend.sheet import display  # noqa: E402

ELEVATION = math.radians(20.0)
FIT = 1.25  # distance margin over the bounding sphere


def orbit_camera(centre: tuple[float, float, float], radius: float):
    """The scene's camera, framing the sphere (centre, radius); returns a function that moves it to an azimuth."""
    import bpy
    from mathutils import Vector

    camera = bpy.data.objects.new("Turntable", bpy.data.cameras.new("Turntable"))
    bpy.context.scene.collection.objects.link(camera)
    bpy.context.scene.camera = camera
    target = Vector(centre)
    distance = FIT * radius / math.sin(math.atan(camera.data.sensor_width / 2.0 / camera.data.lens))

    def place(azimuth: float) -> None:
        direction = Vector(
            (math.cos(ELEVATION) * math.cos(azimuth), math.cos(ELEVATION) * math.sin(azimuth), math.sin(ELEVATION))
        )
        camera.location = target + distance * direction
        camera.rotation_euler = (-direction).to_track_quat("-Z", "Y").to_euler()

    return place


def render_turntable(asset: Path, worlds: list[str], frames: int, size: int, samples: int) -> list[np.ndarray]:
    """Frames [size, size * len(worlds), 3] uint8: the asset under each world, one azimuth per frame."""
    blender.empty_scene()
    meshes = blender.import_asset(asset)
    centre, radius = blender.bounding_sphere(blender.world_bounds(meshes))
    place = orbit_camera(centre, radius)
    blender.use_cycles(size, size, samples=samples, persistent=True)
    cells = [[None] * len(worlds) for _ in range(frames)]
    with tempfile.TemporaryDirectory(prefix="lsrm-turntable-") as scratch:
        for column, world in enumerate(worlds):
            blender.set_world_environment(builtin_environment(world))
            for index in range(frames):
                place(2.0 * math.pi * index / frames)
                rgba = blender.render_linear_rgba(Path(scratch) / "frame.exr")
                cells[index][column] = display(rgba)
                print(f"{world} {index + 1}/{frames}", flush=True)
    return [np.concatenate(row, axis=1) for row in cells]


def write_gif(path: Path, frames: list[np.ndarray], labels: list[str], frame_ms: int = 120) -> None:
    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        width = frame.shape[1] // len(labels)
        for column, label in enumerate(labels):
            draw.text((column * width + 6, 4), label, fill=(235, 235, 235))
        images.append(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        images[0].save(partial, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("asset", type=Path, help="the GLB to show (e.g. out/demo/barrel.glb)")
    parser.add_argument("--out", type=Path, required=True, help="the GIF to write")
    parser.add_argument("--worlds", nargs="+", default=["courtyard", "sunset"], help="studio worlds, side by side")
    parser.add_argument("--frames", type=int, default=16, help="frames per turn (default 16)")
    parser.add_argument("--size", type=int, default=176, help="pixels per view (default 176)")
    parser.add_argument("--samples", type=int, default=24, help="Cycles samples per frame (default 24)")
    args = parser.parse_args()
    frames = render_turntable(args.asset, args.worlds, args.frames, args.size, args.samples)
    write_gif(args.out, frames, args.worlds)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

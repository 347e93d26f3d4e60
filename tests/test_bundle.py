"""Bundles: save/load round trips, the dataset variants we accept, and every kind of bad bundle."""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.bundle import GROUND_TRUTH_CHANNELS, EnvironmentSpec, canonical_normalisation, load_bundle, save_bundle
from backend.colour import linear_to_srgb
from backend.errors import InputError
from tests.test_cameras import cameras_strategy, orbit_cameras, sphere_masks

STUDIO_WORLDS = (
    Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/bpy/5.0/datafiles/studiolights/world"
)
SRGB_STEP = 0.5 / 255 + 1e-6  # the 8-bit rounding a PNG allows, in sRGB units


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@settings(deadline=None, max_examples=15)
@given(cameras_strategy(max_views=3), st.integers(0, 2**32 - 1))
def test_save_then_load_round_trips_cameras_images_and_masks(cameras, seed):
    cameras = cameras.resized(min(cameras.width, 24), min(cameras.height, 20))
    generator = torch.Generator().manual_seed(seed)
    views, height, width = len(cameras), cameras.height, cameras.width
    images = torch.rand(views, height, width, 3, generator=generator)
    masks = torch.rand(views, height, width, generator=generator)
    aabb = torch.tensor([[-1.0, -2.0, -0.5], [1.0, 0.5, 2.0]])
    with tempfile.TemporaryDirectory() as folder:
        save_bundle(Path(folder) / "bundle", cameras, images, masks, aabb=aabb)
        bundle = load_bundle(Path(folder) / "bundle")
    assert (bundle.cameras.width, bundle.cameras.height) == (width, height)
    assert torch.allclose(bundle.cameras.c2w, cameras.c2w.float(), atol=1e-5)
    assert torch.allclose(bundle.cameras.intrinsics, cameras.intrinsics.float(), rtol=1e-6)
    assert (linear_to_srgb(bundle.images) - linear_to_srgb(images)).abs().max() <= SRGB_STEP
    assert (bundle.masks - masks).abs().max() <= SRGB_STEP
    assert torch.equal(bundle.aabb, aabb)
    assert bundle.environment is None and bundle.ground_truth == {}


def test_ground_truth_and_environment_round_trip(tmp_path):
    cameras = orbit_cameras(views=2, size=16)
    generator = torch.Generator().manual_seed(0)
    shape = (2, 16, 16)
    ground_truth = {
        key: torch.rand(*shape, *((3,) if channels == 3 else ()), generator=generator)
        for key, channels in GROUND_TRUTH_CHANNELS.items()
    }
    ground_truth["normal"] = torch.nn.functional.normalize(ground_truth["normal"] - 0.5, dim=-1)
    world = tmp_path / "world.exr"
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {"RGB": np.random.default_rng(0).random((8, 16, 3), dtype=np.float32)}).write(str(world))
    environment = EnvironmentSpec(world, rotation_z=0.7, strength=1.5)
    save_bundle(
        tmp_path / "b",
        cameras,
        torch.rand(*shape, 3),
        torch.ones(shape),
        environment=environment,
        ground_truth=ground_truth,
        names=["left", "right"],
    )
    bundle = load_bundle(tmp_path / "b" / "transforms.json", load_ground_truth=True)
    assert bundle.names == ["images/left", "images/right"]
    assert bundle.environment.path == (tmp_path / "b" / "environment.exr").resolve()
    assert bundle.environment.path.read_bytes() == environment.path.read_bytes()
    assert (bundle.environment.rotation_z, bundle.environment.strength) == (0.7, 1.5)
    assert set(bundle.ground_truth) == set(GROUND_TRUTH_CHANNELS)
    albedo_error = linear_to_srgb(bundle.ground_truth["albedo"]) - linear_to_srgb(ground_truth["albedo"])
    assert albedo_error.abs().max() <= SRGB_STEP
    for key in ("roughness", "metallic"):  # 16-bit PNGs
        assert (bundle.ground_truth[key] - ground_truth[key]).abs().max() <= 0.5 / 65535 + 1e-7
    for key in ("normal", "depth"):  # float32 EXRs are exact
        assert torch.equal(bundle.ground_truth[key], ground_truth[key])
    assert load_bundle(tmp_path / "b").ground_truth == {}


def test_nerf_synthetic_layout_loads(tmp_path):
    """NeRF-synthetic: camera_angle_x only, file paths without extension, RGBA PNGs."""
    pixels = np.zeros((20, 30, 4), np.uint8)
    pixels[5:10, 5:10] = (255, 128, 0, 255)
    write_png(tmp_path / "train" / "r_0.png", pixels)
    write_png(tmp_path / "train" / "r_1.png", pixels)
    frame = {"transform_matrix": np.eye(4).tolist()}
    meta = {"camera_angle_x": 0.6911, "frames": [{**frame, "file_path": f"./train/r_{i}"} for i in range(2)]}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    bundle = load_bundle(tmp_path)
    focal = 0.5 * 30 / math.tan(0.5 * 0.6911)
    assert bundle.cameras.intrinsics[0].tolist() == pytest.approx([focal, focal, 15.0, 10.0])
    assert bundle.names == ["train/r_0", "train/r_1"]
    assert bundle.masks[0, 7, 7] == 1.0 and bundle.masks[0, 0, 0] == 0.0
    assert bundle.images[0, 7, 7, 0] == 1.0 and 0.2 < bundle.images[0, 7, 7, 1] < 0.23  # sRGB 128 -> 0.216
    # OpenGL identity (looking down -Z) becomes OpenCV with Y and Z flipped.
    assert torch.equal(bundle.cameras.c2w[0].diagonal(), torch.tensor([1.0, -1.0, -1.0, 1.0]))


def test_instant_ngp_layout_with_global_and_per_frame_intrinsics_and_mask_files(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.full((12, 16, 3), 200, np.uint8))
    write_png(tmp_path / "images" / "b.png", np.full((12, 16, 3), 100, np.uint8))
    mask = np.zeros((12, 16), np.uint8)
    mask[3:6] = 255
    write_png(tmp_path / "masks" / "b.png", mask)
    meta = {
        "fl_x": 20.0,
        "cx": 7.5,
        "w": 16,
        "h": 12,
        "k1": 0.0,
        "p1": 0.0,
        "aabb_scale": 4,
        "camera_model": "OPENCV",
        "frames": [
            {"file_path": "images/a.png", "transform_matrix": np.eye(4).tolist()},
            {
                "file_path": "images/b.png",
                "mask_path": "masks/b.png",
                "fl_y": 25.0,
                "transform_matrix": np.eye(4).tolist(),
            },
        ],
    }
    meta["frames"][1]["transform_matrix"] = np.eye(4).tolist()
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    bundle = load_bundle(tmp_path)
    assert bundle.cameras.intrinsics.tolist() == [[20.0, 20.0, 7.5, 6.0], [20.0, 25.0, 7.5, 6.0]]
    assert bundle.masks[0].min() == 1.0, "no alpha and no mask file: everything is foreground"
    assert torch.equal(bundle.masks[1], torch.from_numpy(mask / 255.0).float())


def test_canonical_normalisation_from_the_visual_hull_finds_the_object(tmp_path):
    centre, radius = (0.3, -0.2, 0.1), 0.4
    cameras = orbit_cameras(views=10, size=64, focal=70.0)
    masks = sphere_masks(cameras, centre, radius)
    save_bundle(tmp_path / "b", cameras, torch.full((10, 64, 64, 3), 0.5), masks)
    normalisation = canonical_normalisation(load_bundle(tmp_path / "b"), margin=0.1)
    assert torch.allclose(normalisation.centre, torch.tensor(centre), atol=0.05)
    # The hull is a little larger than the sphere, never smaller: the sphere fits inside the box.
    assert 0.75 <= radius * normalisation.scale <= 0.9 + 1e-4


def test_canonical_normalisation_prefers_the_aabb_and_needs_masks_without_one(tmp_path):
    cameras = orbit_cameras(views=3, size=16)
    images, masks = torch.full((3, 16, 16, 3), 0.5), torch.ones(3, 16, 16)
    save_bundle(tmp_path / "b", cameras, images, masks, aabb=torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 1.0]]))
    normalisation = canonical_normalisation(load_bundle(tmp_path / "b"), margin=0.0)
    assert normalisation.centre.tolist() == [1.0, 0.5, 0.5] and normalisation.scale == 1.0
    save_bundle(tmp_path / "c", cameras, images, masks)
    with pytest.raises(InputError, match="masks cover every pixel"):
        canonical_normalisation(load_bundle(tmp_path / "c"))


# ----------------------------------------------------------------------------- bad bundles


def valid_bundle(folder: Path) -> dict:
    """Three 8x6 RGBA views with per-frame intrinsics; returns the transforms dict (also written)."""
    frames = []
    for index in range(3):
        write_png(folder / "images" / f"{index}.png", np.full((6, 8, 4), 255, np.uint8))
        c2w = np.eye(4)
        c2w[:3, 3] = (index, 0.0, 4.0)
        frames.append({"file_path": f"images/{index}.png", "transform_matrix": c2w.tolist(), "fl_x": 10.0})
    meta = {"w": 8, "h": 6, "frames": frames}
    (folder / "transforms.json").write_text(json.dumps(meta))
    return meta


def set_frame(index: int, **values):
    def change(meta: dict, folder: Path) -> None:
        meta["frames"][index].update(values)

    return change


def scale_matrix(meta: dict, folder: Path) -> None:
    meta["frames"][1]["transform_matrix"] = (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()


def mirror_matrix(meta: dict, folder: Path) -> None:
    meta["frames"][1]["transform_matrix"] = (np.diag([-1.0, 1.0, 1.0, 1.0])).tolist()


def nan_matrix(meta: dict, folder: Path) -> None:
    meta["frames"][2]["transform_matrix"][0][3] = float("nan")


def projective_matrix(meta: dict, folder: Path) -> None:
    meta["frames"][0]["transform_matrix"][3] = [0.0, 0.0, 0.5, 1.0]


def short_matrix(meta: dict, folder: Path) -> None:
    meta["frames"][1]["transform_matrix"] = [[1.0, 0.0, 0.0]]


def drop_matrix(meta: dict, folder: Path) -> None:
    del meta["frames"][0]["transform_matrix"]


def drop_focal(meta: dict, folder: Path) -> None:
    for frame in meta["frames"]:
        del frame["fl_x"]


def no_frames(meta: dict, folder: Path) -> None:
    meta["frames"] = []


def corrupt_image(meta: dict, folder: Path) -> None:
    (folder / "images" / "1.png").write_bytes(b"\x89PNG not really")


def other_resolution(meta: dict, folder: Path) -> None:
    write_png(folder / "images" / "2.png", np.zeros((8, 8, 4), np.uint8))
    del meta["w"], meta["h"]


def escape_with_dots(meta: dict, folder: Path) -> None:
    write_png(folder.parent / "outside.png", np.zeros((6, 8, 4), np.uint8))
    meta["frames"][1]["file_path"] = "../outside.png"


def escape_with_symlink(meta: dict, folder: Path) -> None:
    write_png(folder.parent / "outside.png", np.zeros((6, 8, 4), np.uint8))
    os.symlink(folder.parent / "outside.png", folder / "images" / "link.png")
    meta["frames"][2]["file_path"] = "images/link.png"


def absolute_path(meta: dict, folder: Path) -> None:
    meta["frames"][1]["file_path"] = str((folder / "images" / "1.png").resolve())


def bad_aabb(meta: dict, folder: Path) -> None:
    meta["aabb"] = [[0.0, 0.0, 0.0], [1.0, -1.0, 1.0]]


def environment_outside(meta: dict, folder: Path) -> None:
    meta["environment"] = {"file_path": "../world.exr", "rotation_z": 0.0}


BAD_BUNDLES = [
    # (what is wrong, how to break a valid bundle, load_bundle keyword arguments, expected message)
    ("missing image", set_frame(1, file_path="images/nope.png"), {}, r"frame 1 field 'file_path'.*does not exist"),
    ("unreadable image", corrupt_image, {}, r"frame 1 field 'file_path': cannot read image"),
    ("size vs intrinsics", set_frame(2, w=9), {}, r"frame 2 field 'w' says 9 pixels but the image is 8x6"),
    ("mixed resolutions", other_resolution, {}, r"frame 2 field 'file_path'.*share one resolution"),
    ("non-finite matrix", nan_matrix, {}, r"frame 2 field 'transform_matrix' holds NaN"),
    ("scaled matrix", scale_matrix, {}, r"frame 1 field 'transform_matrix' is not rigid"),
    ("mirrored matrix", mirror_matrix, {}, r"frame 1 field 'transform_matrix' is not rigid"),
    ("projective last row", projective_matrix, {}, r"frame 0 field 'transform_matrix' has a last row"),
    ("matrix not 4x4", short_matrix, {}, r"frame 1 field 'transform_matrix' is missing or not a 4x4"),
    ("matrix missing", drop_matrix, {}, r"frame 0 field 'transform_matrix' is missing"),
    ("no focal length", drop_focal, {}, r"frame 0 field 'fl_x' is missing"),
    ("zero focal length", set_frame(1, fl_x=0.0), {}, r"frame 1 field 'fl_x' must be a positive"),
    ("text focal length", set_frame(1, fl_y="big"), {}, r"frame 1 field 'fl_y' is 'big', not a finite number"),
    ("distortion", set_frame(0, k1=0.1), {}, r"frame 0 field 'k1'.*undistort the images first"),
    ("fisheye", set_frame(2, camera_model="OPENCV_FISHEYE"), {}, r"frame 2 field 'camera_model'.*not a pinhole"),
    ("no views", no_frames, {}, r"field 'frames' must be a non-empty list"),
    ("too many views", lambda meta, folder: None, {"max_views": 2}, r"3 frames exceed the limit of 2"),
    (
        "oversized image",
        lambda meta, folder: None,
        {"max_image_pixels": 40},
        r"frame 0 field 'file_path'.*over the limit",
    ),
    (
        "duplicate image",
        set_frame(2, file_path="images/0.png"),
        {},
        r"frame 2 field 'file_path'.*same image as frame 0",
    ),
    ("parent folder", escape_with_dots, {}, r"frame 1 field 'file_path'.*outside the bundle folder"),
    ("symlink out", escape_with_symlink, {}, r"frame 2 field 'file_path'.*outside the bundle folder"),
    ("absolute path", absolute_path, {}, r"frame 1 field 'file_path' is an absolute path"),
    ("bad aabb", bad_aabb, {}, r"field 'aabb' must be"),
    ("environment outside", environment_outside, {}, r"environment field 'file_path'.*outside the bundle folder"),
]


@pytest.mark.parametrize(("what", "breaks", "options", "message"), BAD_BUNDLES, ids=[case[0] for case in BAD_BUNDLES])
def test_bad_bundles_are_rejected_with_frame_and_field(tmp_path, what, breaks, options, message):
    folder = tmp_path / "bundle"
    meta = valid_bundle(folder)
    load_bundle(folder)  # the unbroken bundle is fine
    breaks(meta, folder)
    (folder / "transforms.json").write_text(json.dumps(meta))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=message):
        load_bundle(folder, **options)
    assert sorted(tmp_path.rglob("*")) == before, "loading must never write"


def test_malformed_and_missing_transforms(tmp_path):
    with pytest.raises(InputError, match=r"no transforms\.json"):
        load_bundle(tmp_path)
    (tmp_path / "transforms.json").write_text('{"frames": [}')
    with pytest.raises(InputError, match="malformed JSON at line 1 column 13"):
        load_bundle(tmp_path)
    (tmp_path / "transforms.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="top level must be a JSON object"):
        load_bundle(tmp_path / "transforms.json")


def test_failed_save_leaves_nothing_behind(tmp_path):
    cameras = orbit_cameras(views=2, size=8)
    missing_world = EnvironmentSpec(tmp_path / "no_such_world.exr", rotation_z=0.0)
    with pytest.raises(InputError, match="does not exist"):
        save_bundle(tmp_path / "b", cameras, torch.zeros(2, 8, 8, 3), torch.ones(2, 8, 8), environment=missing_world)
    with pytest.raises(ValueError, match="ground truth"):
        ground_truth = {"albedo": torch.zeros(2, 8, 8)}  # albedo needs three channels
        save_bundle(tmp_path / "b", cameras, torch.zeros(2, 8, 8, 3), torch.ones(2, 8, 8), ground_truth=ground_truth)
    assert list(tmp_path.iterdir()) == []


def test_save_failing_midway_keeps_the_old_bundle(tmp_path, monkeypatch):
    cameras = orbit_cameras(views=2, size=8)
    images, masks = torch.zeros(2, 8, 8, 3), torch.ones(2, 8, 8)
    save_bundle(tmp_path / "b", cameras, images, masks)
    old = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr("backend.bundle._write_ground_truth", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_bundle(tmp_path / "b", cameras, images, masks, ground_truth={"depth": torch.ones(2, 8, 8)})
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == old

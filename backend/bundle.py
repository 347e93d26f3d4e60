"""Bundles: the folder of posed views that enters the backend (DESIGN §3).

A bundle is a `transforms.json` in the nerfstudio / instant-ngp / NeRF-synthetic format plus the
images it names. Per frame: `file_path` and `transform_matrix` (camera-to-world, OpenGL camera
convention); intrinsics `fl_x fl_y cx cy w h` per frame or global, or NeRF-synthetic's
`camera_angle_x` (+ `camera_angle_y`). Optional keys of ours: `aabb` ([[min xyz], [max xyz]],
world units), `environment` ({"file_path", "rotation_z", "strength"}), per-frame `mask_path`, and
per-frame ground-truth buffers `<key>_path` (see `save_bundle`).

Everything that comes out of `load_bundle` is checked: a broken bundle raises `InputError` with one
sentence naming the frame and the field. Images come out linear (sRGB-decoded) with straight
(not premultiplied) alpha as the mask; cameras come out in the backend's OpenCV convention.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import OpenEXR
import torch
from PIL import Image

from .atomic import atomic_directory
from .cameras import Cameras, Normalisation, occupied_bounds, opengl_to_opencv, viewed_region, visual_hull
from .colour import linear_to_srgb, srgb_to_linear
from .errors import InputError
from .exr import read_exr, stack_channels

TRANSFORMS = "transforms.json"
# Ground-truth buffers a bundle may carry per frame, with their channel counts and file types:
# albedo is an sRGB 8-bit PNG, roughness and metallic linear 16-bit PNGs, normal (world-space unit
# vectors) and depth (camera z-depth, world units) float32 EXRs, since 16-bit RGB PNG is not
# something Pillow can write.
GROUND_TRUTH_CHANNELS = {"albedo": 3, "roughness": 1, "metallic": 1, "normal": 3, "depth": 1}
_GROUND_TRUTH_SUFFIX = {"albedo": ".png", "roughness": ".png", "metallic": ".png", "normal": ".exr", "depth": ".exr"}
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
_PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")
_RIGID_TOLERANCE = 1e-3  # on R^T R - I and det R - 1; JSON printed from float32 stays well inside
# How finely the silhouettes are carved to find the region of interest (two passes).
_HULL_RESOLUTION = 64


@dataclass
class EnvironmentSpec:
    """The known lighting of a bundle: an equirectangular HDR/EXR placed like Blender's world."""

    path: Path
    rotation_z: float  # radians: the Z rotation of a Mapping node on the world's environment texture
    strength: float = 1.0


@dataclass
class Bundle:
    """A loaded, validated bundle. Tensors live on the CPU; images are linear."""

    root: Path
    names: list[str]
    cameras: Cameras  # world frame, OpenCV convention
    images: torch.Tensor  # [V, H, W, 3] float32 linear, straight alpha
    masks: torch.Tensor  # [V, H, W] float32 in [0, 1]
    aabb: torch.Tensor | None = None  # [2, 3] min and max corners, world units
    environment: EnvironmentSpec | None = None
    ground_truth: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [V, H, W(, 3)]


# ----------------------------------------------------------------------------- loading


def load_bundle(
    path: Path,
    *,
    max_views: int = 512,
    max_image_pixels: int = 4096 * 4096,
    load_ground_truth: bool = False,
) -> Bundle:
    """Read and validate a bundle folder (or the transforms.json inside it)."""
    path = Path(path)
    transforms = path if path.is_file() else path / TRANSFORMS
    root = transforms.parent
    if not transforms.is_file():
        raise InputError(f"no {TRANSFORMS} at '{path}'; point to a bundle folder that contains one.")
    meta = _read_json(transforms)
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{transforms}: field 'frames' must be a non-empty list of views; add at least one frame.")
    if len(frames) > max_views:
        raise InputError(f"{transforms}: {len(frames)} frames exceed the limit of {max_views}; send fewer views.")
    _check_camera_model(meta, "the top level")

    names, c2w_gl, intrinsics, images, masks = [], [], [], [], []
    first_image_of: dict[Path, int] = {}
    size: tuple[int, int] | None = None
    for index, frame in enumerate(frames):
        where = f"frame {index}"
        if not isinstance(frame, dict):
            raise InputError(f"{transforms}: {where} is not a JSON object; give each frame as {{...}}.")
        _check_camera_model(frame, where)
        image_path = _bundle_file(root, frame, where, "file_path", try_png=True)
        if image_path in first_image_of:
            raise InputError(
                f"{where} field 'file_path' names the same image as frame {first_image_of[image_path]}; "
                "give every frame its own image."
            )
        first_image_of[image_path] = index
        c2w_gl.append(_rigid_matrix(frame.get("transform_matrix"), where))

        pixels = _read_image(image_path, where, "file_path", max_image_pixels)
        height, width = pixels.shape[:2]
        if size is None:
            size = (width, height)
        elif size != (width, height):
            raise InputError(
                f"{where} field 'file_path': image is {width}x{height} but frame 0 is {size[0]}x{size[1]}; "
                "all views of a bundle must share one resolution, so resize or crop them to match."
            )
        intrinsics.append(_intrinsics(meta, frame, where, width, height))

        if "mask_path" in frame:
            mask_path = _bundle_file(root, frame, where, "mask_path", try_png=True)
            mask = _read_image(mask_path, where, "mask_path", max_image_pixels)
            if mask.shape[:2] != (height, width):
                raise InputError(
                    f"{where} field 'mask_path': mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{width}x{height}; give a mask of the image's size."
                )
            mask = mask[..., 0]
        elif pixels.shape[2] == 4:
            mask = pixels[..., 3]
        else:
            mask = np.ones((height, width), np.float32)
        images.append(pixels[..., :3])
        masks.append(mask)
        names.append(image_path.relative_to(root.resolve()).with_suffix("").as_posix())

    cameras = Cameras(
        c2w=opengl_to_opencv(torch.stack(c2w_gl)),
        intrinsics=torch.tensor(intrinsics, dtype=torch.float32),
        width=size[0],
        height=size[1],
    )
    return Bundle(
        root=root,
        names=names,
        cameras=cameras,
        images=srgb_to_linear(torch.from_numpy(np.stack(images))),
        masks=torch.from_numpy(np.stack(masks)),
        aabb=_aabb(meta.get("aabb")),
        environment=_environment(root, meta.get("environment")),
        ground_truth=_read_ground_truth(root, frames, size, max_image_pixels) if load_ground_truth else {},
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path}: malformed JSON at line {error.lineno} column {error.colno} ({error.msg}); fix the file."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(
            f"{path}: cannot read the file ({error}); check that it is a readable UTF-8 text file."
        ) from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: the top level must be a JSON object with a 'frames' list; fix the file.")
    return meta


def _check_camera_model(entry: dict[str, Any], where: str) -> None:
    model = entry.get("camera_model")
    if model is not None and model not in _PINHOLE_MODELS:
        raise InputError(
            f"{where} field 'camera_model' is {model!r}, not a pinhole model; convert the views to perspective "
            "pinhole images first."
        )


def _bundle_file(root: Path, entry: dict[str, Any], where: str, key: str, try_png: bool = False) -> Path:
    """The file an entry names under `key`, resolved, checked to exist inside the bundle folder."""
    where = f"{where} field '{key}'"
    name = entry.get(key)
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where} is missing or not a string; give the file's path relative to the bundle folder.")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise InputError(f"{where} is an absolute path ({name!r}); give a path relative to the bundle folder.")
    inside = root.resolve()
    candidate = root / name
    # NeRF-synthetic writes "./train/r_0" and means "./train/r_0.png".
    if try_png and not candidate.exists() and (root / f"{name}.png").exists():
        candidate = root / f"{name}.png"
    resolved = candidate.resolve()
    if not resolved.is_relative_to(inside):
        raise InputError(f"{where} ({name!r}) points outside the bundle folder; keep every file inside it.")
    if not resolved.is_file():
        raise InputError(f"{where}: file {name!r} does not exist in the bundle folder; add it or fix the path.")
    return resolved


def _rigid_matrix(value: Any, where: str) -> torch.Tensor:
    """A 4x4 camera-to-world matrix, checked to be finite and rigid, re-orthonormalised."""
    field_name = f"{where} field 'transform_matrix'"
    try:
        matrix = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.shape != (4, 4):
        raise InputError(f"{field_name} is missing or not a 4x4 list of numbers; give the camera-to-world matrix.")
    if not torch.isfinite(matrix).all():
        raise InputError(f"{field_name} holds NaN or infinite values; export a valid camera pose.")
    if (matrix[3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)).abs().max() > _RIGID_TOLERANCE:
        raise InputError(f"{field_name} has a last row other than 0 0 0 1; give an affine camera-to-world matrix.")
    rotation = matrix[:3, :3]
    orthonormality = (rotation.T @ rotation - torch.eye(3, dtype=torch.float64)).abs().max()
    if orthonormality > _RIGID_TOLERANCE or abs(torch.linalg.det(rotation) - 1.0) > _RIGID_TOLERANCE:
        raise InputError(
            f"{field_name} is not rigid (its rotation is not orthonormal with determinant +1); "
            "remove scale, shear and mirroring from the camera pose."
        )
    # Snap to the nearest rotation so later rigid inverses are exact.
    u, _, vh = torch.linalg.svd(rotation)
    matrix[:3, :3] = u @ vh
    return matrix.float()


def _number(meta: dict[str, Any], frame: dict[str, Any], key: str, where: str) -> float | None:
    """A per-frame value, else the global one, else None; must be a finite number."""
    value = frame.get(key, meta.get(key))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{where} field '{key}' is {value!r}, not a finite number; fix it in {TRANSFORMS}.")
    return float(value)


def _intrinsics(meta: dict[str, Any], frame: dict[str, Any], where: str, width: int, height: int) -> list[float]:
    """fx, fy, cx, cy in pixels for one frame, checked against its image size."""
    for key in _DISTORTION_KEYS:
        if _number(meta, frame, key, where):
            raise InputError(
                f"{where} field '{key}' is non-zero but only pinhole cameras are supported; undistort the images "
                "first and set the distortion to zero."
            )
    for key, actual in (("w", width), ("h", height)):
        stated = _number(meta, frame, key, where)
        if stated is not None and stated != actual:
            raise InputError(
                f"{where} field '{key}' says {stated:g} pixels but the image is {width}x{height}; make the "
                "intrinsics match the image or resize the image."
            )

    def focal(key: str, angle_key: str, extent: int) -> float | None:
        value = _number(meta, frame, key, where)
        if value is None:
            angle = _number(meta, frame, angle_key, where)
            if angle is None:
                return None
            if not 0.0 < angle < math.pi:
                raise InputError(f"{where} field '{angle_key}' must be in (0, pi) radians; fix the field of view.")
            value = 0.5 * extent / math.tan(0.5 * angle)
        if not value > 0.0:
            raise InputError(f"{where} field '{key}' must be a positive focal length in pixels; fix the intrinsics.")
        return value

    fx = focal("fl_x", "camera_angle_x", width)
    if fx is None:
        raise InputError(f"{where} field 'fl_x' is missing (and no 'camera_angle_x'); give the focal length in pixels.")
    fy = focal("fl_y", "camera_angle_y", height) or fx
    cx = _number(meta, frame, "cx", where)
    cy = _number(meta, frame, "cy", where)
    return [fx, fy, width / 2.0 if cx is None else cx, height / 2.0 if cy is None else cy]


def _read_image(path: Path, where: str, key: str, max_pixels: int) -> np.ndarray:
    """An image as float32 [H, W, C] in [0, 1] (still sRGB-encoded), C = 3 or 4 (with alpha)."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise InputError(
                    f"{where} field '{key}': image is {image.width}x{image.height}, over the limit of {max_pixels} "
                    "pixels; downscale it."
                )
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale
                grey = np.asarray(image, dtype=np.float32) / 65535.0
                return np.repeat(grey[..., None], 3, axis=-1)
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
            return np.asarray(image, dtype=np.float32) / 255.0
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(
            f"{where} field '{key}': cannot read image '{path.name}' ({error}); replace it with a valid PNG or JPEG."
        ) from None


def _aabb(value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    try:
        aabb = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError):
        aabb = None
    if aabb is None or aabb.shape != (2, 3) or not torch.isfinite(aabb).all() or not (aabb[1] > aabb[0]).all():
        raise InputError(
            "field 'aabb' must be [[min x, min y, min z], [max x, max y, max z]] with finite values and max > min; "
            "fix or remove it."
        )
    return aabb


def _environment(root: Path, value: Any) -> EnvironmentSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError("field 'environment' must be an object with 'file_path', 'rotation_z' and 'strength'.")
    path = _bundle_file(root, value, "environment", "file_path")
    rotation = _number({}, value, "rotation_z", "environment") or 0.0
    strength = _number({}, value, "strength", "environment")
    strength = 1.0 if strength is None else strength
    if strength < 0.0:
        raise InputError("environment field 'strength' must not be negative; fix the world strength.")
    return EnvironmentSpec(path=path, rotation_z=rotation, strength=strength)


def _read_ground_truth(
    root: Path, frames: list[dict[str, Any]], size: tuple[int, int], max_pixels: int
) -> dict[str, torch.Tensor]:
    """The ground-truth buffers that frame 0 names; every other frame must name them too."""
    keys = [key for key in GROUND_TRUTH_CHANNELS if f"{key}_path" in frames[0]]
    buffers: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for index, frame in enumerate(frames):
        for key in keys:
            where = f"frame {index}"
            path = _bundle_file(root, frame, where, f"{key}_path")
            if path.suffix.lower() == ".exr":
                channels = read_exr(path, f"{where} field '{key}_path'")
                rgb = stack_channels(channels, "RGB")
                data = rgb if rgb is not None else next(iter(channels.values()))
            else:
                data = _read_image(path, where, f"{key}_path", max_pixels)
                data = data[..., :3] if GROUND_TRUTH_CHANNELS[key] == 3 else data[..., 0]
            if data.shape[:2] != (size[1], size[0]):
                raise InputError(
                    f"{where} field '{key}_path' is {data.shape[1]}x{data.shape[0]}, not the views' "
                    f"{size[0]}x{size[1]}; write it at the image resolution."
                )
            buffers[key].append(data)
    ground_truth = {key: torch.from_numpy(np.stack(values)).float() for key, values in buffers.items()}
    if "albedo" in ground_truth:
        ground_truth["albedo"] = srgb_to_linear(ground_truth["albedo"])
    return ground_truth


# ----------------------------------------------------------------------------- saving


def save_bundle(
    path: Path,
    cameras: Cameras,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    aabb: torch.Tensor | None = None,
    environment: EnvironmentSpec | None = None,
    ground_truth: dict[str, torch.Tensor] | None = None,
    names: list[str] | None = None,
) -> Path:
    """Write a bundle folder all-or-nothing: transforms.json, RGBA sRGB PNGs (alpha = mask), extras.

    images [V, H, W, 3] are linear, masks [V, H, W] in [0, 1]. Ground-truth buffers (keys of
    GROUND_TRUTH_CHANNELS, [V, H, W] or [V, H, W, 3]) land in one folder per key; the environment
    file is copied into the bundle. Returns the path of the written transforms.json.
    """
    views, height, width = len(cameras), cameras.height, cameras.width
    if images.shape != (views, height, width, 3) or masks.shape != (views, height, width):
        raise ValueError(
            f"expected images [{views}, {height}, {width}, 3] and masks [{views}, {height}, {width}], "
            f"got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    names = [f"{index:04d}" for index in range(views)] if names is None else list(names)
    if len(names) != views or len(set(names)) != views or not all(re.fullmatch(r"[\w.-]+", n) for n in names):
        raise ValueError("names must be one unique file-name-safe string per view")
    if environment is not None and not Path(environment.path).is_file():
        raise InputError(f"environment file '{environment.path}' does not exist; give an existing .exr or .hdr file.")
    ground_truth = ground_truth or {}
    for key, buffer in ground_truth.items():
        channels = GROUND_TRUTH_CHANNELS.get(key)
        expected = (views, height, width) + ((3,) if channels == 3 else ())
        if channels is None or tuple(buffer.shape) != expected:
            raise ValueError(f"ground truth {key!r} must be one of {list(GROUND_TRUTH_CHANNELS)} shaped {expected}")

    c2w_gl = opengl_to_opencv(cameras.c2w.detach().cpu().float())
    intrinsics = cameras.intrinsics.detach().cpu().float()
    rgb = _to_uint8(linear_to_srgb(images.detach().cpu().float()))
    alpha = _to_uint8(masks.detach().cpu().float())

    meta: dict[str, Any] = {"w": width, "h": height, "camera_model": "OPENCV"}
    if aabb is not None:
        meta["aabb"] = torch.as_tensor(aabb, dtype=torch.float32).tolist()
    frames = []
    with atomic_directory(path) as folder:
        (folder / "images").mkdir()
        if environment is not None:
            environment_name = f"environment{Path(environment.path).suffix.lower()}"
            shutil.copyfile(environment.path, folder / environment_name)
            meta["environment"] = {
                "file_path": environment_name,
                "rotation_z": float(environment.rotation_z),
                "strength": float(environment.strength),
            }
        for key in ground_truth:
            (folder / key).mkdir()
        for view, name in enumerate(names):
            file_path = f"images/{name}.png"
            Image.fromarray(np.dstack([rgb[view], alpha[view]]), "RGBA").save(folder / file_path)
            fx, fy, cx, cy = intrinsics[view].tolist()
            frame = {"file_path": file_path, "transform_matrix": c2w_gl[view].tolist()}
            frame.update(fl_x=fx, fl_y=fy, cx=cx, cy=cy)
            for key, buffer in ground_truth.items():
                frame[f"{key}_path"] = _write_ground_truth(folder, key, name, buffer[view].detach().cpu().float())
            frames.append(frame)
        meta["frames"] = frames
        (folder / TRANSFORMS).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(path) / TRANSFORMS


def _to_uint8(values: torch.Tensor) -> np.ndarray:
    return (values.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def _write_ground_truth(folder: Path, key: str, name: str, buffer: torch.Tensor) -> str:
    """Write one frame's buffer in its key's format; return its path relative to the bundle."""
    relative = f"{key}/{name}{_GROUND_TRUTH_SUFFIX[key]}"
    if key == "albedo":
        Image.fromarray(_to_uint8(linear_to_srgb(buffer)), "RGB").save(folder / relative)
    elif key in ("roughness", "metallic"):
        sixteen_bit = (buffer.clamp(0.0, 1.0) * 65535.0).round().to(torch.int32).numpy().astype(np.uint16)
        Image.fromarray(sixteen_bit).save(folder / relative)
    else:
        channel = "RGB" if buffer.ndim == 3 else "Y"
        header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
        OpenEXR.File(header, {channel: np.ascontiguousarray(buffer.numpy())}).write(str(folder / relative))
    return relative


# ----------------------------------------------------------------------------- canonical box


def canonical_normalisation(bundle: Bundle, margin: float = 0.1) -> Normalisation:
    """The map of the bundle's region of interest into [-1, 1]^3: its aabb, else the masks' visual hull."""
    if bundle.aabb is not None:
        return Normalisation.from_aabb(bundle.aabb, margin)
    if (bundle.masks >= 0.5).all():
        raise InputError(
            "the bundle has no 'aabb' and its masks cover every pixel, so the object cannot be located; "
            "give views with an alpha mask or an 'aabb' in transforms.json."
        )
    try:
        region = viewed_region(bundle.cameras)
    except ValueError:
        raise InputError(
            "the bundle has no 'aabb' and its cameras do not look at a common region; give an 'aabb' in "
            "transforms.json."
        ) from None
    # Coarse pass over everything the cameras look at, then a finer pass inside what survived.
    for _ in range(2):
        occupancy = visual_hull(bundle.cameras, bundle.masks, region, _HULL_RESOLUTION)
        if not occupancy.any():
            raise InputError(
                "the masks carve away everything the cameras see together; check the masks and camera poses, "
                "or give an 'aabb' in transforms.json."
            )
        region = occupied_bounds(occupancy, region, padding=1)
    return Normalisation.from_aabb(region, margin)

"""Shading: equirectangular HDR environments, and GGX + Lambert under them (split-sum).

Orientation follows Blender's world exactly (verified against Cycles in tests/test_shading.py):
the Environment Texture node maps a world direction d = (x, y, z) to
    u = 0.5 - atan2(y, x) / 2π   (left to right),   v = acos(z) / π   (top row = straight up),
so the image centre looks along +X and its left quarter along +Y. A Mapping node rotating the
texture vector by `rotation_z` about Z (tests/blender_scene.set_world_environment) looks the
texture up at Rz(rotation_z) · d; `Environment.rotation_z` means the same.

The BRDF is the metallic-roughness model of glTF and Blender's Principled BSDF: F0 = lerp(0.04, albedo,
metallic), GGX with alpha = roughness², height-correlated Smith shadowing, a Lambert base under the
dielectric coat, and Blender's multiscatter-GGX energy compensation. Image-based lighting uses the
split-sum approximation: a roughness-prefiltered environment (read at a roughness narrowed with the
view angle, as the true lobe narrows) times a BRDF lookup table, plus a cosine-convolved irradiance map
for the diffuse part. All colours are linear.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .exr import read_exr, stack_channels

ENVIRONMENTS_DIR = Path(__file__).resolve().parent / "assets" / "environments"
BUILTIN_ENVIRONMENTS = ("city", "courtyard", "forest", "interior", "night", "studio", "sunrise", "sunset")

DIELECTRIC_F0 = 0.04  # IOR 1.5, Blender's Principled default
PREFILTER_ROUGHNESS_LEVELS = 6  # roughness 0, 0.2, ..., 1; lookups interpolate between the two nearest
PREFILTER_MAX_WIDTH = 256  # widest prefiltered level above roughness 0 (the sharpest glossy lobe fits)
PREFILTER_SAMPLES = 64  # GGX samples per prefiltered texel (filtered importance sampling)
PREFILTER_LOD_BIAS = 1.0  # mip levels added to each sample's footprint (smooths the sample pattern)
IRRADIANCE_SIZE = (32, 64)  # the cosine convolution is smooth, a small map holds it
BRDF_LUT_SIZE = 32
VIEW_LOBE_MIN_COS = 0.05  # the view-dependent lobe narrowing stops here (grazing views stay finite)
BRDF_LUT_SAMPLES = 1024


def builtin_environment(name: str = "studio") -> Path:
    """Path of one of Blender's eight CC0 studio-light worlds shipped with the backend."""
    if name not in BUILTIN_ENVIRONMENTS:
        raise InputError(f"unknown built-in environment '{name}'; use one of {', '.join(BUILTIN_ENVIRONMENTS)}")
    return ENVIRONMENTS_DIR / f"{name}.exr"


# ---------------------------------------------------------------------------------------------
# Reading HDR images


def _read_exr(path: Path) -> np.ndarray:
    channels = read_exr(path, "environment map")
    image = stack_channels(channels, "RGB")
    if image is None and "Y" in channels:
        image = np.repeat(channels["Y"][..., None], 3, axis=-1)
    if image is None:
        raise InputError(f"{path}: the EXR has no R, G, B (or Y) channels; save the environment as an RGB EXR")
    return image


def _read_hdr(path: Path) -> np.ndarray:
    """Radiance RGBE (.hdr/.pic): flat or new-style run-length encoded scanlines, -Y H +X W only."""
    data = path.read_bytes()
    header_end = data.find(b"\n\n")
    if not data.startswith((b"#?RADIANCE", b"#?RGBE")) or header_end < 0:
        raise InputError(f"{path}: not a Radiance HDR file (bad header); export it as .hdr or .exr")
    if b"FORMAT=32-bit_rle_rgbe" not in data[:header_end]:
        raise InputError(f"{path}: only the RGBE pixel format is supported; convert the file to RGBE .hdr or .exr")
    size_end = data.index(b"\n", header_end + 2)
    size = data[header_end + 2 : size_end].split()
    if len(size) != 4 or size[0] != b"-Y" or size[2] != b"+X":
        raise InputError(f"{path}: unsupported HDR orientation '{b' '.join(size).decode()}'; re-save it as -Y H +X W")
    height, width = int(size[1]), int(size[3])
    pixels = np.frombuffer(data, dtype=np.uint8, offset=size_end + 1)
    rgbe = np.empty((height, width, 4), dtype=np.uint8)
    pos = 0
    try:
        for row in range(height):
            head = pixels[pos : pos + 4]
            if 8 <= width < 32768 and head[0] == 2 and head[1] == 2 and (int(head[2]) << 8 | int(head[3])) == width:
                pos += 4
                for channel in range(4):  # new RLE: each channel of the scanline coded separately
                    column = 0
                    while column < width:
                        count = int(pixels[pos])
                        pos += 1
                        if count > 128:  # a run of one value
                            count -= 128
                            rgbe[row, column : column + count, channel] = pixels[pos]
                            pos += 1
                        else:  # literal values
                            rgbe[row, column : column + count, channel] = pixels[pos : pos + count]
                            pos += count
                        column += count
            else:  # flat scanline
                rgbe[row] = pixels[pos : pos + 4 * width].reshape(width, 4)
                pos += 4 * width
    except (IndexError, ValueError) as error:
        raise InputError(f"{path}: the HDR pixel data is truncated or corrupt ({error}); re-export the file") from None
    exponent = rgbe[..., 3:].astype(np.float32)
    scale = np.where(exponent > 0, np.ldexp(1.0, (exponent - 136).astype(np.int32)), 0.0)
    # Mantissas were truncated when written: +0.5 decodes to the middle of each step (as Radiance does).
    return ((rgbe[..., :3].astype(np.float32) + 0.5) * scale).astype(np.float32)


def read_environment_image(path: str | Path) -> torch.Tensor:
    """An equirectangular HDR image [H, W, 3], linear, rows from the top (straight up), negatives clipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"environment map {path} does not exist; give the path of an .exr or .hdr file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".exr":
            image = _read_exr(path)
        elif suffix in (".hdr", ".pic"):
            image = _read_hdr(path)
        else:
            raise InputError(f"environment map {path} is not .exr or .hdr; convert it to one of those")
    except InputError:
        raise
    except Exception as error:  # the EXR library reports corrupt files with assorted exception types
        raise InputError(f"environment map {path} cannot be read ({error}); check the file or re-export it") from None
    if image.ndim != 3 or image.shape[0] < 2 or image.shape[1] != 2 * image.shape[0]:
        raise InputError(
            f"environment map {path} is {image.shape[1]}x{image.shape[0]}, not equirectangular (width = 2 x height); "
            "use a lat-long panorama"
        )
    if not np.isfinite(image).all():
        raise InputError(f"environment map {path} contains NaN or infinite pixels; clamp or re-export it")
    # Compressed HDRs carry tiny negative values (and some maps large ones near the sun): light is never negative.
    return torch.from_numpy(np.ascontiguousarray(np.clip(image, 0.0, None)))


# ---------------------------------------------------------------------------------------------
# Equirectangular geometry and lookups


def direction_to_equirect(directions: torch.Tensor) -> torch.Tensor:
    """Blender's equirectangular coordinates (u, v) in [0, 1] of unit directions [..., 3]; v = 0 is straight up."""
    x, y, z = directions.unbind(-1)
    u = 0.5 - torch.atan2(y, x) / (2.0 * math.pi)
    # acos has an infinite slope at the poles: the value is exact, the gradient comes from z kept just inside.
    inside = z.clamp(-1.0 + 1e-6, 1.0 - 1e-6)
    v = (torch.acos(inside) + (torch.acos(z.clamp(-1.0, 1.0)) - torch.acos(inside)).detach()) / math.pi
    return torch.stack([u, v], dim=-1)


def equirect_directions(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit directions through the texel centres of an equirectangular image, [H, W, 3]."""
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    theta, phi = torch.meshgrid(v * math.pi, (0.5 - u) * 2.0 * math.pi, indexing="ij")
    return torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], dim=-1)


def texel_solid_angles(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Solid angle of each texel row of an equirectangular image, [H, 1]; they sum to 4π over the image."""
    edges = torch.arange(height + 1, device=device, dtype=torch.float64) * (math.pi / height)
    band = edges[:-1].cos() - edges[1:].cos()
    return (band * (2.0 * math.pi / width)).float()[:, None]


def bilinear(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wrap_x: bool = False) -> torch.Tensor:
    """Bilinear lookup of image [H, W, C] at continuous texel coordinates x, y [...] (texel centres at k + 0.5).

    Rows clamp at the border; columns clamp too, or wrap around when `wrap_x` (longitude).
    Differentiable with respect to the image and to the coordinates.
    """
    height, width = image.shape[:2]
    x, y = x - 0.5, y - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.long(), y0.long()
    if wrap_x:
        xs = (x0 % width, (x0 + 1) % width)
    else:
        xs = (x0.clamp(0, width - 1), (x0 + 1).clamp(0, width - 1))
    ys = (y0.clamp(0, height - 1), (y0 + 1).clamp(0, height - 1))
    flat = image.reshape(height * width, -1)

    def at(row: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        return flat[row * width + column]

    top = at(ys[0], xs[0]) * (1 - fx) + at(ys[0], xs[1]) * fx
    bottom = at(ys[1], xs[0]) * (1 - fx) + at(ys[1], xs[1]) * fx
    return top * (1 - fy) + bottom * fy


def sample_equirect(image: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of an equirectangular image [H, W, C] along unit directions [..., 3] -> [..., C]."""
    uv = direction_to_equirect(directions)
    height, width = image.shape[:2]
    return bilinear(image, uv[..., 0] * width, uv[..., 1] * height, wrap_x=True)


def _downsample(image: torch.Tensor) -> torch.Tensor:
    """Halve an equirectangular image [H, W, C] by averaging 2x2 texels."""
    return F.avg_pool2d(image.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)


def _rotate_z(directions: torch.Tensor, angle: float) -> torch.Tensor:
    if angle == 0.0:
        return directions
    c, s = math.cos(angle), math.sin(angle)
    x, y, z = directions.unbind(-1)
    return torch.stack([c * x - s * y, s * x + c * y, z], dim=-1)


# ---------------------------------------------------------------------------------------------
# GGX


def ggx_alpha(roughness: torch.Tensor) -> torch.Tensor:
    """GGX alpha from perceptual roughness (Blender and glTF square it); floored so the lobe stays finite."""
    return (roughness * roughness).clamp_min(1e-4)


def _hammersley(count: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A low-discrepancy 2D point set [count, 2] in [0, 1)^2, so start-up tables are deterministic."""
    index = torch.arange(count, dtype=torch.int64)
    bits = index.clone()
    radical = torch.zeros(count, dtype=dtype)
    scale = 0.5
    while bool((bits > 0).any()):
        radical += (bits & 1).to(dtype) * scale
        bits >>= 1
        scale /= 2.0
    return torch.stack([(index.to(dtype) + 0.5) / count, radical], dim=-1)


def _ggx_half_vector_cos(alpha: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """cos(theta_h) of GGX-distributed half vectors (D(h) cos(theta_h) importance sampling)."""
    return torch.sqrt((1.0 - xi) / (1.0 + (alpha * alpha - 1.0) * xi))


def _smith_lambda(cos_theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    tan2 = (1.0 - cos_theta * cos_theta).clamp_min(0.0) / (cos_theta * cos_theta).clamp_min(1e-12)
    return 0.5 * (torch.sqrt(1.0 + alpha * alpha * tan2) - 1.0)


@functools.cache
def brdf_lut(size: int = BRDF_LUT_SIZE, samples: int = BRDF_LUT_SAMPLES) -> torch.Tensor:
    """The split-sum GGX table [size, size, 2] (rows: roughness 0..1, columns: n·v 0..1).

    For each entry, the directional albedo of GGX splits into F0 * A + B (Schlick's Fresnel).
    Computed once at start-up by importance sampling, in float64; nothing is downloaded.
    """
    grid = torch.linspace(0.0, 1.0, size, dtype=torch.float64)
    roughness, cos_v = torch.meshgrid(grid, grid.clamp_min(0.5 / size), indexing="ij")
    alpha = ggx_alpha(roughness)[..., None]
    cos_v = cos_v[..., None]
    xi = _hammersley(samples)
    cos_h = _ggx_half_vector_cos(alpha, xi[:, 0])
    sin_h = torch.sqrt(1.0 - cos_h * cos_h)
    phi = 2.0 * math.pi * xi[:, 1]
    # View in the x-z plane; half vector h; light l = reflect(-v, h).
    sin_v = torch.sqrt(1.0 - cos_v * cos_v)
    v_dot_h = (sin_v * sin_h * phi.cos() + cos_v * cos_h).clamp_min(0.0)
    cos_l = 2.0 * v_dot_h * cos_h - cos_v
    visible = cos_l > 0
    shadowing = 1.0 / (1.0 + _smith_lambda(cos_v, alpha) + _smith_lambda(cos_l.clamp_min(1e-6), alpha))
    # Estimator of ∫ f cos dl with pdf(l) = D cos_h / (4 v·h): weight = G v·h / (cos_h cos_v).
    weight = torch.where(visible, shadowing * v_dot_h / (cos_h * cos_v), torch.zeros_like(cos_l))
    fresnel = (1.0 - v_dot_h) ** 5
    scale = (weight * (1.0 - fresnel)).mean(-1)
    bias = (weight * fresnel).mean(-1)
    return torch.stack([scale, bias], dim=-1).float()


@functools.cache
def _brdf_lut_on(device: torch.device) -> torch.Tensor:
    """brdf_lut() moved to a device once (a host-to-device copy at every shade call stalls the GPU)."""
    return brdf_lut().to(device)


def _lookup_brdf_lut(cos_v: torch.Tensor, roughness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lut = _brdf_lut_on(cos_v.device)
    size = lut.shape[0]
    # Texel centres of the table sit at k / (size - 1); bilinear() puts them at k + 0.5.
    x = cos_v.clamp(0.0, 1.0) * (size - 1) + 0.5
    y = roughness.clamp(0.0, 1.0) * (size - 1) + 0.5
    values = bilinear(lut, x, y)
    return values[..., 0], values[..., 1]


def specular_albedo(f0: torch.Tensor, cos_v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
    """Directional albedo of multiscatter GGX with reflectance f0 [..., C] (split-sum + energy compensation).

    Single-scatter GGX loses energy at high roughness; Blender's multiscatter GGX puts it back. The
    compensation factor 1 + F0 (1 / E - 1), with E the white-furnace albedo A + B, is Turquin's.
    """
    scale, bias = _lookup_brdf_lut(cos_v, roughness)
    scale, bias = scale[..., None], bias[..., None]
    single = f0 * scale + bias
    return single * (1.0 + f0 * (1.0 / (scale + bias).clamp_min(1e-4) - 1.0))


# ---------------------------------------------------------------------------------------------
# Environment


class Environment:
    """An equirectangular HDR environment (linear RGB) with Blender's orientation, rotation and strength.

    `image` [H, W, 3] is in texture space (row 0 straight up); a direction d in the world looks the
    texture up at Rz(rotation_z) · d and the result is multiplied by `strength`. Split-sum tables
    (prefiltered levels, irradiance) are built on first use, in texture space, so rotation and
    strength can change freely. They are differentiable with respect to `image` (an estimated
    environment can be optimised through shading).
    """

    def __init__(self, image: torch.Tensor, rotation_z: float = 0.0, strength: float = 1.0) -> None:
        if image.ndim != 3 or image.shape[-1] != 3 or image.shape[1] != 2 * image.shape[0]:
            raise ValueError(f"an environment image must be [H, 2H, 3], got {tuple(image.shape)}")
        self.image = image
        self.rotation_z = float(rotation_z)
        self.strength = float(strength)
        self._tables: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self._tables_key: tuple | None = None
        self._file_key: tuple | None = None  # (path, mtime, device, image id, version) when loaded from a file

    @staticmethod
    def load(
        path: str | Path, rotation_z: float = 0.0, strength: float = 1.0, device: torch.device | str = "cpu"
    ) -> Environment:
        """Read an .exr or .hdr equirectangular map; rotation_z in radians as Blender's Mapping node."""
        if not (math.isfinite(rotation_z) and math.isfinite(strength) and strength >= 0.0):
            raise InputError(
                f"environment rotation {rotation_z} / strength {strength} must be finite, strength >= 0; fix the values"
            )
        environment = Environment(read_environment_image(path).to(device), rotation_z, strength)
        path = Path(path).resolve()
        image = environment.image
        environment._file_key = (str(path), path.stat().st_mtime_ns, str(image.device), id(image), image._version)
        return environment

    @staticmethod
    def uniform(
        colour: tuple[float, float, float] = (1.0, 1.0, 1.0), device: torch.device | str = "cpu"
    ) -> Environment:
        """A constant environment (a white furnace for colour (1, 1, 1))."""
        image = torch.tensor(colour, dtype=torch.float32, device=device).expand(16, 32, 3).contiguous()
        return Environment(image)

    @property
    def device(self) -> torch.device:
        return self.image.device

    def to(self, device: torch.device | str) -> Environment:
        return Environment(self.image.to(device), self.rotation_z, self.strength)

    def _texture_directions(self, directions: torch.Tensor) -> torch.Tensor:
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return _rotate_z(directions, self.rotation_z)

    def radiance(self, directions: torch.Tensor) -> torch.Tensor:
        """Radiance [..., 3] arriving from world directions [..., 3] (what a camera sees as background)."""
        return sample_equirect(self.image, self._texture_directions(directions)) * self.strength

    def irradiance(self, normals: torch.Tensor) -> torch.Tensor:
        """Cosine-weighted radiance over the hemisphere of each normal, divided by π, [..., 3].

        Times a Lambert albedo this is the diffuse outgoing radiance.
        """
        _, irradiance = self._split_sum_tables()
        return sample_equirect(irradiance, self._texture_directions(normals)) * self.strength

    def prefiltered(self, directions: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        """Radiance around reflected directions [..., 3] blurred by a GGX lobe of each roughness [...]."""
        levels, _ = self._split_sum_tables()
        directions = self._texture_directions(directions)
        position = roughness.clamp(0.0, 1.0) * (len(levels) - 1)
        # Levels are a pyramid indexed by roughness: each point blends the two around its own.
        result = _sample_levels(levels, directions.reshape(-1, 3), position.reshape(-1))
        return result.reshape(*directions.shape[:-1], -1) * self.strength

    def _split_sum_tables(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        # Rebuilt when the image is replaced or stepped in place by an optimiser, or starts needing gradients.
        key = (id(self.image), self.image._version, self.image.requires_grad and torch.is_grad_enabled())
        if self._tables is None or self._tables_key != key:
            unchanged_file = self._file_key is not None and key == (*self._file_key[-2:], False)
            if unchanged_file:
                self._tables = _cached_tables(self._file_key, self.image)
            else:
                self._tables = (prefilter_levels(self.image), irradiance_map(self.image))
            self._tables_key = key
        return self._tables


# Split-sum tables of environment files, built once per process and device (seconds on a CPU). Bounded:
# the service loads a new file for every job, and each entry holds the full-size image (megabytes).
_FILE_TABLES: OrderedDict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = OrderedDict()
FILE_TABLES_KEPT = 4


def _cached_tables(file_key: tuple, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    if file_key not in _FILE_TABLES:
        with torch.no_grad():
            _FILE_TABLES[file_key] = (prefilter_levels(image), irradiance_map(image))
        while len(_FILE_TABLES) > FILE_TABLES_KEPT:
            _FILE_TABLES.popitem(last=False)
    _FILE_TABLES.move_to_end(file_key)
    return _FILE_TABLES[file_key]


def _mip_pyramid(image: torch.Tensor) -> list[torch.Tensor]:
    pyramid = [image]
    while pyramid[-1].shape[0] > 1:
        pyramid.append(_downsample(pyramid[-1]))
    return pyramid


def _sample_pyramid(pyramid: list[torch.Tensor], directions: torch.Tensor, lod: torch.Tensor) -> torch.Tensor:
    """Trilinear lookup [N, C]: bilinear in the two mip levels around a fractional level of detail [N]."""
    uv = direction_to_equirect(directions)  # the same texture coordinates at every level
    lod = lod.clamp(0.0, len(pyramid) - 1)
    lower = lod.floor().long()
    upper_weight = (lod - lower)[:, None]
    result = torch.zeros(*directions.shape[:-1], pyramid[0].shape[-1], device=directions.device)
    for index, level in enumerate(pyramid):
        for used, weight in ((lower == index, 1.0 - upper_weight), (lower == index - 1, upper_weight)):
            rows = used.nonzero()[:, 0]
            if len(rows):
                height, width = level.shape[:2]
                values = bilinear(level, uv[rows, 0] * width, uv[rows, 1] * height, wrap_x=True)
                result = result.index_add(0, rows, values * weight[rows])
    return result


def _sample_levels(levels: list[torch.Tensor], directions: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """`_sample_pyramid` for a few levels without data-dependent indexing: every level is read at every point
    and weighted (zero for all but the two around `position`), so a lookup never waits for the GPU."""
    uv = direction_to_equirect(directions)
    position = position.clamp(0.0, len(levels) - 1)[:, None]
    result = None
    for index, level in enumerate(levels):
        weight = (1.0 - (position - index).abs()).clamp_min(0.0)
        height, width = level.shape[:2]
        values = bilinear(level, uv[:, 0] * width, uv[:, 1] * height, wrap_x=True) * weight
        result = values if result is None else result + values
    return result


def prefilter_levels(image: torch.Tensor, levels: int = PREFILTER_ROUGHNESS_LEVELS) -> list[torch.Tensor]:
    """Environment images convolved with GGX lobes of roughness k / (levels - 1), k = 0..levels-1.

    Level 0 (a mirror) is the image itself. The others use filtered importance sampling (Křivánek and
    Colbert): GGX samples around each texel direction (n = v = r, the split-sum assumption), each read
    from the mip level whose texels match the sample's share of the lobe, so few samples give no noise.
    """
    pyramid = _mip_pyramid(image)
    height, width = image.shape[:2]
    source_texel = 4.0 * math.pi / (height * width)
    xi = _hammersley(PREFILTER_SAMPLES, torch.float32).to(image.device)
    result = [image]
    for index in range(1, levels):
        roughness = index / (levels - 1)
        alpha = max(roughness * roughness, 1e-4)
        level_width = max(32, min(PREFILTER_MAX_WIDTH, width) >> (index - 1))
        normal = equirect_directions(level_width // 2, level_width, image.device).reshape(-1, 1, 3)
        up = torch.tensor([0.0, 0.0, 1.0], device=image.device).expand_as(normal)
        up = torch.where(normal[..., 2:].abs() > 0.999, torch.tensor([1.0, 0.0, 0.0], device=image.device), up)
        tangent = F.normalize(torch.linalg.cross(up, normal, dim=-1), dim=-1)
        bitangent = torch.linalg.cross(normal, tangent, dim=-1)
        cos_h = _ggx_half_vector_cos(torch.tensor(alpha), xi[:, 0])  # [samples]
        sin_h, phi = torch.sqrt(1.0 - cos_h * cos_h), 2.0 * math.pi * xi[:, 1]
        half = tangent * (sin_h * phi.cos())[:, None] + bitangent * (sin_h * phi.sin())[:, None]
        half = half + normal * cos_h[:, None]
        cos_l = 2.0 * cos_h * cos_h - 1.0  # n·l when n = v
        light = 2.0 * cos_h[:, None] * half - normal
        # pdf of l is D(h) / 4 when n = v; one sample covers 1 / (count * pdf) steradians.
        d = alpha * alpha / (math.pi * ((alpha * alpha - 1.0) * cos_h * cos_h + 1.0) ** 2)
        sample_solid_angle = 4.0 / (PREFILTER_SAMPLES * d)
        sin_theta = torch.sqrt((1.0 - light[..., 2] ** 2).clamp_min(1e-4))
        lod = 0.5 * torch.log2(sample_solid_angle / (source_texel * sin_theta * math.pi / 2)) + PREFILTER_LOD_BIAS
        weight = cos_l.clamp_min(0.0).expand(lod.shape)
        radiance = _sample_pyramid(pyramid, light.reshape(-1, 3), lod.reshape(-1)).reshape(*lod.shape, 3)
        filtered = (radiance * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1e-8)
        result.append(filtered.reshape(level_width // 2, level_width, 3))
    return result


def irradiance_map(image: torch.Tensor, size: tuple[int, int] = IRRADIANCE_SIZE) -> torch.Tensor:
    """Cosine convolution of the environment divided by π, [h, w, 3], by direct summation over texels."""
    source = image
    while source.shape[0] > 64:  # area-averaging keeps the energy of small bright lights
        source = _downsample(source)
    height, width = source.shape[:2]
    light = equirect_directions(height, width, image.device).reshape(-1, 3)
    solid_angle = texel_solid_angles(height, width, image.device).expand(height, width).reshape(-1, 1)
    weighted = source.reshape(-1, 3) * solid_angle / math.pi
    normals = equirect_directions(*size, device=image.device).reshape(-1, 3)
    cosine = (normals @ light.T).clamp_min(0.0)
    return (cosine @ weighted).reshape(*size, 3)


# ---------------------------------------------------------------------------------------------
# Shading


def shade(
    normals: torch.Tensor,
    view_dirs: torch.Tensor,
    albedo: torch.Tensor,
    roughness: torch.Tensor,
    metallic: torch.Tensor,
    environment: Environment,
) -> torch.Tensor:
    """Outgoing linear radiance [..., 3] of GGX + Lambert surfaces lit by the environment.

    normals, view_dirs: [..., 3] unit vectors, view_dirs pointing from the surface towards the viewer;
    albedo [..., 3]; roughness, metallic [...] in [0, 1].
    """
    normals = F.normalize(normals, dim=-1)
    cos_v = (normals * view_dirs).sum(-1).clamp(1e-4, 1.0)
    reflected = 2.0 * cos_v[..., None] * normals - view_dirs
    metallic_ = metallic[..., None]
    f0 = DIELECTRIC_F0 * (1.0 - metallic_) + albedo * metallic_
    # The tables are prefiltered for a view along the normal. Seen at an angle, the reflected lobe is
    # compressed by n·v along the plane of incidence (dω_l = 4 (v·h) dω_h), so small lights give
    # sharper, brighter highlights: read the level whose lobe has the same solid angle, alpha' = alpha sqrt(n·v).
    lobe_roughness = roughness * cos_v.clamp_min(VIEW_LOBE_MIN_COS) ** 0.25
    specular = environment.prefiltered(reflected, lobe_roughness) * specular_albedo(f0, cos_v, roughness)
    # The Lambert base sits under the dielectric coat and receives what the coat does not reflect.
    coat = specular_albedo(torch.full_like(cos_v[..., None], DIELECTRIC_F0), cos_v, roughness)
    diffuse = albedo * (1.0 - metallic_) * (1.0 - coat) * environment.irradiance(normals)
    return diffuse + specular

"""Environments (reading, Blender's orientation) and GGX + Lambert split-sum shading."""

import math

import numpy as np
import pytest
import torch

from backend.cameras import Cameras, image_rays, opengl_to_opencv
from backend.errors import InputError
from backend.shading import (
    BUILTIN_ENVIRONMENTS,
    Environment,
    brdf_lut,
    builtin_environment,
    direction_to_equirect,
    equirect_directions,
    read_environment_image,
    shade,
    texel_solid_angles,
)


def random_unit(count: int, seed: int = 0) -> torch.Tensor:
    directions = torch.randn(count, 3, generator=torch.Generator().manual_seed(seed))
    return directions / directions.norm(dim=-1, keepdim=True)


def gradient_environment() -> Environment:
    """A smooth test sky: red rises towards +X, green towards +Y, blue towards +Z."""
    directions = equirect_directions(64, 128)
    return Environment((directions + 1.0).clamp_min(0.0) * torch.tensor([1.0, 0.5, 0.25]))


def test_builtin_environments_ship_with_the_backend():
    for name in BUILTIN_ENVIRONMENTS:
        assert builtin_environment(name).is_file()
    assert (builtin_environment().parent / "CREDITS.md").is_file()
    with pytest.raises(InputError, match="unknown built-in environment"):
        builtin_environment("moon")


def test_equirect_mapping_matches_blender_convention():
    # Blender: the image centre looks along +X, a quarter to the left along +Y, row 0 straight up.
    axes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    uv = direction_to_equirect(axes)
    assert torch.allclose(uv[:3], torch.tensor([[0.5, 0.5], [0.25, 0.5], [0.75, 0.5]]), atol=1e-6)
    assert torch.allclose(uv[3:, 1], torch.tensor([0.0, 1.0]), atol=1e-6)
    # Texel-centre directions map back onto their texel centres.
    directions = equirect_directions(8, 16)
    uv = direction_to_equirect(directions)
    assert torch.allclose(uv[..., 1] * 8, torch.arange(8.0)[:, None].expand(8, 16) + 0.5, atol=1e-4)
    assert torch.allclose(uv[..., 0] * 16, torch.arange(16.0).expand(8, 16) + 0.5, atol=1e-4)


def test_texel_solid_angles_cover_the_sphere():
    assert texel_solid_angles(32, 64).sum().item() * 64 == pytest.approx(4 * math.pi, rel=1e-5)


def test_radiance_lookup_rotation_and_strength():
    environment = gradient_environment()
    directions = random_unit(500)
    base = environment.radiance(directions)
    expected = (directions + 1.0) * torch.tensor([1.0, 0.5, 0.25])
    assert torch.allclose(base, expected, atol=0.05)  # bilinear interpolation error of a smooth map
    environment.rotation_z, environment.strength = math.pi / 2, 2.0
    rotated = environment.radiance(directions)
    # The texture is looked up at Rz(90°) d: (x, y) -> (-y, x).
    turned = torch.stack([-directions[:, 1], directions[:, 0], directions[:, 2]], dim=-1)
    assert torch.allclose(rotated, 2.0 * (turned + 1.0) * torch.tensor([1.0, 0.5, 0.25]), atol=0.1)


def test_reading_exr_and_hdr(tmp_path):
    image = read_environment_image(builtin_environment("studio"))
    assert image.shape == (512, 1024, 3) and image.min() >= 0.0 and image.max() > 10.0

    # A Radiance file written here (run-length encoded scanlines) reads back to the same values.
    values = np.exp(np.random.default_rng(0).normal(size=(16, 32, 3))).astype(np.float32)
    mantissa, exponent = np.frexp(values.max(-1))
    rgbe = np.concatenate(
        [values * (mantissa * 256.0 / values.max(-1))[..., None], (exponent + 128)[..., None]], -1
    ).astype(np.uint8)
    body = bytearray()
    for row in rgbe:
        body += bytes([2, 2, 0, 32])
        for channel in range(4):
            body += bytes([32]) + row[:, channel].tobytes()  # one literal run of the whole scanline
    path = tmp_path / "sky.hdr"
    path.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 16 +X 32\n" + bytes(body))
    loaded = read_environment_image(path).numpy()
    # RGBE shares one exponent per pixel: each channel is exact to half a step of the brightest one.
    assert (np.abs(loaded - values) <= values.max(-1, keepdims=True) / 256).all()

    with pytest.raises(InputError, match="does not exist"):
        Environment.load(tmp_path / "missing.exr")
    (tmp_path / "bad.hdr").write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a Radiance HDR"):
        Environment.load(tmp_path / "bad.hdr")
    (tmp_path / "sky.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"not \.exr or \.hdr"):
        Environment.load(tmp_path / "sky.png")


def test_brdf_lut_is_physical():
    lut = brdf_lut()
    scale, bias = lut[..., 0], lut[..., 1]
    assert (scale >= 0).all() and (bias >= 0).all() and (scale + bias <= 1.0 + 1e-3).all()
    assert scale[0, -1] == pytest.approx(1.0, abs=1e-3)  # a mirror seen head-on reflects everything
    assert (scale + bias)[-1, -1] < (scale + bias)[0, -1]  # rough single-scatter GGX loses energy


def test_white_furnace_conserves_energy():
    # Under a uniform white sky, a white surface returns (almost) exactly the incoming light:
    # multiscatter GGX restores what single scattering loses, and the Lambert base takes the rest.
    environment = Environment.uniform()
    normals = random_unit(400, seed=1)
    views = torch.nn.functional.normalize(normals + 0.5 * random_unit(400, seed=2), dim=-1)
    views = torch.where((normals * views).sum(-1, keepdim=True) > 0.05, views, normals)
    for roughness in (0.0, 0.3, 0.7, 1.0):
        r = torch.full((400,), roughness)
        for metallic in (0.0, 1.0):
            rgb = shade(normals, views, torch.ones(400, 3), r, torch.full((400,), metallic), environment)
            assert rgb.min() > 0.95 and rgb.max() < 1.05, (roughness, metallic)
    # Dark albedo stays dark; black metal reflects nothing.
    grey = shade(normals, views, torch.full((400, 3), 0.2), r, torch.zeros(400), environment)
    assert 0.2 < grey.mean() < 0.3
    black_metal = shade(normals, views, torch.zeros(400, 3), r, torch.ones(400), environment)
    assert black_metal.max() < 1e-3


def test_split_sum_tables_follow_the_environment():
    environment = Environment.load(builtin_environment("studio"))
    normals = random_unit(2000, seed=3)
    # Irradiance is the cosine-weighted mean of radiance: check one normal against direct summation.
    directions = equirect_directions(128, 256).reshape(-1, 3)
    weights = texel_solid_angles(128, 256).expand(128, 256).reshape(-1)
    radiance = environment.radiance(directions)
    for normal in normals[:3]:
        cosine = (directions @ normal).clamp_min(0.0)
        expected = (radiance * (cosine * weights)[:, None]).sum(0) / math.pi
        assert torch.allclose(environment.irradiance(normal[None])[0], expected, rtol=0.03)
    # Roughness 0 is the mirror image; roughness 1 is nearly as smooth as the irradiance.
    assert torch.allclose(environment.prefiltered(normals, torch.zeros(2000)), environment.radiance(normals))
    rough = environment.prefiltered(normals, torch.ones(2000))
    sharp = environment.prefiltered(normals, torch.full((2000,), 0.2))
    assert rough.std() < sharp.std() < environment.radiance(normals).std()
    # Blurring moves light around but keeps the solid-angle-weighted mean.
    mean = (radiance * weights[:, None]).sum(0) / weights.sum()
    rough_all = environment.prefiltered(directions, torch.ones(len(directions)))
    assert torch.allclose((rough_all * weights[:, None]).sum(0) / weights.sum(), mean, rtol=0.1)


def test_shading_is_differentiable():
    environment = gradient_environment()
    normals = random_unit(64, seed=4).requires_grad_(True)
    albedo = torch.full((64, 3), 0.5, requires_grad=True)
    roughness = torch.full((64,), 0.4, requires_grad=True)
    metallic = torch.full((64,), 0.3, requires_grad=True)
    shade(normals, normals.detach(), albedo, roughness, metallic, environment).sum().backward()
    for tensor in (normals, albedo, roughness, metallic):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0 and tensor.grad.isfinite().all()


@pytest.mark.blender
def test_environment_orientation_matches_blender(bpy, tmp_path):
    """Cycles renders the world background; our lookup along the same camera rays must agree."""
    from blender_addon.capture import camera_frame
    from tests import blender_scene

    rotation = 0.7
    scene = blender_scene.use_cycles(48, 32, samples=4, transparent=False)
    scene.cycles.filter_width = 0.01  # one ray through each pixel centre, as ours
    blender_scene.set_world_environment(blender_scene.studio_world("forest"), rotation_z=rotation, strength=1.5)
    camera = blender_scene.add_camera_looking_at("Camera", (0.0, 0.0, 0.0), target=(1.0, 0.6, 0.35), lens=12.0)
    scene.camera = camera
    bpy.context.view_layer.update()
    blender = blender_scene.render_linear_rgba(tmp_path / "world.exr")[..., :3]

    frame = camera_frame(camera, scene)
    c2w = opengl_to_opencv(torch.tensor(frame["transform_matrix"], dtype=torch.float32))
    intrinsics = torch.tensor([[frame["fl_x"], frame["fl_y"], frame["cx"], frame["cy"]]])
    _, directions = image_rays(Cameras(c2w[None], intrinsics, frame["w"], frame["h"]))

    def mean_error(environment: Environment) -> float:
        ours = environment.radiance(directions[0]).numpy()
        return float(np.abs(ours - blender).mean() / blender.mean())

    path = builtin_environment("forest")
    error = mean_error(Environment.load(path, rotation_z=rotation, strength=1.5))
    print(f"world background vs Cycles: mean relative error {error:.4f}")
    assert error < 0.03
    # The opposite rotation sense, or none, is clearly worse: the test can tell orientations apart.
    assert mean_error(Environment.load(path, rotation_z=-rotation, strength=1.5)) > 5 * error
    assert mean_error(Environment.load(path, rotation_z=0.0, strength=1.5)) > 5 * error

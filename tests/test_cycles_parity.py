"""Parity with Cycles: our VolSDF renderer + split-sum shading against Blender's path tracer.

The same sphere (analytic SDF for us, a smooth high-resolution UV sphere for Cycles) with a Principled
BSDF, the same camera (exported from Blender the way the add-on does) and the same rotated studio HDRI.
PSNR is measured on linear RGB clipped to the displayable [0, 1] (peak 1.0), inside the pixels both
renderers cover fully: the reflected studio lights reach 45 in linear units, and without the clip a
one-pixel shift of such a highlight would outweigh everything else in the image.
"""

import math

import numpy as np
import pytest
import torch

from backend.cameras import Cameras, opengl_to_opencv
from backend.render import RenderOptions, render_views
from backend.shading import Environment, builtin_environment
from tests.fields import UniformSphere

RADIUS = 0.6
SIZE = 96
CYCLES_SAMPLES = 512
WORLD_ROTATION = 0.6


def cycles_sphere(bpy, albedo, roughness: float, metallic: float) -> None:
    bpy.ops.mesh.primitive_uv_sphere_add(segments=256, ring_count=128, radius=RADIUS)
    sphere = bpy.context.active_object
    bpy.ops.object.shade_smooth()
    material = bpy.data.materials.new("Sphere")
    principled = material.node_tree.nodes["Principled BSDF"]
    principled.inputs["Base Color"].default_value = (*albedo, 1.0)
    principled.inputs["Roughness"].default_value = roughness
    principled.inputs["Metallic"].default_value = metallic
    principled.inputs["IOR"].default_value = 1.5  # F0 = 0.04, our dielectric
    sphere.data.materials.append(material)


def psnr(ours: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    error = ((np.clip(ours, 0.0, 1.0) - np.clip(reference, 0.0, 1.0)) ** 2)[mask].mean()
    return float(10.0 * math.log10(1.0 / error))


def render_pair(bpy, tmp_path, albedo, roughness: float, metallic: float) -> float:
    from scipy.ndimage import binary_erosion

    from blender_addon.capture import camera_frame
    from tests import blender_scene

    scene = blender_scene.use_cycles(SIZE, SIZE, samples=CYCLES_SAMPLES)
    scene.cycles.filter_width = 0.01  # a ray through each pixel centre, as ours
    scene.cycles.seed = 1
    world = builtin_environment("studio")
    blender_scene.set_world_environment(world, rotation_z=WORLD_ROTATION)
    cycles_sphere(bpy, albedo, roughness, metallic)
    scene.camera = blender_scene.add_camera_looking_at("Camera", (1.6, -2.2, 0.9), lens=50.0)
    bpy.context.view_layer.update()
    reference = blender_scene.render_linear_rgba(tmp_path / "cycles.exr")

    frame = camera_frame(scene.camera, scene)
    c2w = opengl_to_opencv(torch.tensor(frame["transform_matrix"], dtype=torch.float32))
    intrinsics = torch.tensor([[frame["fl_x"], frame["fl_y"], frame["cx"], frame["cy"]]])
    cameras = Cameras(c2w[None], intrinsics, frame["w"], frame["h"])
    environment = Environment.load(world, rotation_z=WORLD_ROTATION)
    with torch.no_grad():
        ours = render_views(
            UniformSphere(RADIUS, albedo, roughness, metallic, beta=1e-3), cameras, environment, RenderOptions()
        )
    rgb, alpha = ours.rgb[0].numpy(), ours.alpha[0, ..., 0].numpy()

    # Fully covered pixels only, one pixel in from the silhouette (polygon edge vs. exact sphere).
    mask = binary_erosion((alpha > 0.999) & (reference[..., 3] > 0.999))
    assert mask.sum() > 0.3 * SIZE * SIZE * math.pi * 0.25 * 0.5
    assert np.abs(alpha - reference[..., 3]).mean() < 0.02  # the silhouettes agree
    return psnr(rgb, reference[..., :3], mask)


@pytest.mark.blender
@pytest.mark.slow
def test_diffuse_sphere_matches_cycles(bpy, tmp_path):
    value = render_pair(bpy, tmp_path, albedo=(0.8, 0.55, 0.3), roughness=1.0, metallic=0.0)
    print(f"\nparity diffuse (roughness 1, metallic 0): PSNR {value:.2f} dB inside the mask")
    assert value >= 30.0


@pytest.mark.blender
@pytest.mark.slow
def test_glossy_sphere_matches_cycles(bpy, tmp_path):
    value = render_pair(bpy, tmp_path, albedo=(0.9, 0.7, 0.45), roughness=0.3, metallic=1.0)
    print(f"\nparity glossy (roughness 0.3, metallic 1): PSNR {value:.2f} dB inside the mask")
    # Cycles' own noise is far below this (two seeds agree to 47 dB). What remains is split-sum: the
    # environment is prefiltered for a view along the normal, and shade() only approximates the lobe's
    # view-dependent narrowing by an equal-area roughness, so highlight shapes and peaks still differ
    # (a brute-force GGX integral has peaks twice as bright as the n = v = r prefilter). Blender's metal
    # Fresnel is Schlick here (F82 tint white adds nothing). Measured 20.0 dB (17.9 before the
    # view-dependent roughness); the floor sits an honest margin below.
    assert value >= 18.5

"""`python -m backend synth` and `export-gt`: real bundles and GLBs on disk, bad arguments rejected cleanly."""

import subprocess
import sys

import numpy as np
import pygltflib
import pytest
import torch

from backend.bundle import load_bundle
from backend.cameras import Normalisation, image_rays
from backend.cli import main
from backend.data.synthetic import export_ground_truth, random_object, world_normalisation
from backend.shading import Environment
from tests.conftest import REPO


def test_synth_command_writes_a_bundle_that_loads_and_matches_the_object(tmp_path):
    out = tmp_path / "bundle"
    command = [sys.executable, "-m", "backend", "synth", "--seed", "3", "--views", "4", "--res", "48"]
    result = subprocess.run(
        [*command, "--out", str(out), "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr

    bundle = load_bundle(out, load_ground_truth=True)
    assert len(bundle.cameras) == 4 and (bundle.cameras.width, bundle.cameras.height) == (48, 48)
    assert bundle.images.shape == (4, 48, 48, 3) and bundle.masks.shape == (4, 48, 48)
    coverage = (bundle.masks > 0.5).float().mean(dim=(1, 2))
    assert ((coverage > 0.02) & (coverage < 0.9)).all(), coverage
    assert set(bundle.ground_truth) == {"albedo", "roughness", "metallic", "normal", "depth"}
    assert Environment.load(bundle.environment.path, bundle.environment.rotation_z).image.shape[-1] == 3

    # The aabb normalises the world back onto the object's own canonical frame...
    obj = random_object(3)
    normalisation = Normalisation.from_aabb(bundle.aabb)
    assert torch.allclose(normalisation.centre, world_normalisation(3, obj).centre, atol=1e-5)
    # ...where the ground-truth depth of every solidly covered pixel lands on the object's surface.
    origins, directions = image_rays(bundle.cameras)
    forward = bundle.cameras.c2w[:, None, None, :3, 2]
    distance = bundle.ground_truth["depth"][..., None] / (directions * forward).sum(-1, keepdim=True)
    solid = bundle.masks > 0.99
    surface = normalisation.to_canonical((origins + distance * directions)[solid])
    assert float(obj.sdf(surface).abs().quantile(0.95)) < 0.02
    normals = bundle.ground_truth["normal"][solid]
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(normals)), atol=0.02)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--views", "0"], "--views 0"),
        (["--res", "8"], "--res 8"),
        (["--seed", "-1"], "--seed -1"),
        (["--env", "missing.exr"], "does not exist"),
        (["--env", "transforms.txt"], "not .exr or .hdr"),
    ],
)
def test_synth_rejects_bad_arguments_and_writes_nothing(tmp_path, capsys, arguments, message):
    (tmp_path / "transforms.txt").write_text("not an environment")
    arguments = [str(tmp_path / a) if a.endswith((".exr", ".txt")) else a for a in arguments]
    out = tmp_path / "bundle"
    assert main(["synth", "--res", "32", "--views", "2", *arguments, "--out", str(out), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not out.exists()


def test_synth_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"keep me")
    assert main(["synth", "--views", "1", "--res", "16", "--out", str(precious), "--device", "cpu"]) == 2
    assert "is not a bundle" in capsys.readouterr().err
    assert (precious / "holiday.jpg").read_bytes() == b"keep me"


def test_bad_synth_argument_fails_as_a_process_with_exit_code_2(tmp_path):
    out = tmp_path / "bundle"
    result = subprocess.run(
        [sys.executable, "-m", "backend", "synth", "--views", "0", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--views 0" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_export_ground_truth_writes_a_glb_of_the_object_in_world_units(tmp_path):
    out = export_ground_truth(seed=3, out=tmp_path / "gt.glb", resolution=48, texture_size=64, target_faces=0)
    gltf = pygltflib.GLTF2().load(str(out))
    position = gltf.accessors[gltf.meshes[0].primitives[0].attributes.POSITION]
    size_glb = np.sort(np.array(position.max) - np.array(position.min))
    obj = random_object(3)
    size_world = np.sort(((obj.bounds[1] - obj.bounds[0]) / world_normalisation(3, obj).scale).numpy())
    # Marching cubes on a 48^3 grid and the padded sampled bounds agree to a few grid cells.
    assert np.allclose(size_glb, size_world, rtol=0.1), (size_glb, size_world)


def test_export_gt_rejects_a_bad_resolution_without_writing(tmp_path, capsys):
    out = tmp_path / "gt.glb"
    assert main(["export-gt", "--seed", "1", "--resolution", "4", "--out", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()

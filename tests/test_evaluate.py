"""`python -m backend evaluate`: bad input, the Blender-side helpers, and one small asset end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.cli import main
from backend.errors import InputError
from backend.evaluate import EvaluateConfig, evaluate, reconstruction_settings
from backend.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_missing_and_unsupported_assets_are_input_errors(tmp_path, capsys):
    with pytest.raises(InputError, match="does not exist"):
        evaluate([tmp_path / "nowhere.glb"], tmp_path / "out")
    (tmp_path / "model.fbx").write_bytes(b"not a format we read")
    with pytest.raises(InputError, match="unsupported extension"):
        evaluate([tmp_path / "model.fbx"], tmp_path / "out")
    assert main(["evaluate", str(tmp_path / "nowhere.obj"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.blender
def test_an_asset_without_faces_is_an_input_error(bpy, tmp_path):
    from backend.blender_render import import_asset

    points_only = tmp_path / "points.obj"
    points_only.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(InputError, match="no mesh with faces"):
        import_asset(points_only)


@pytest.mark.blender
def test_bounds_and_surface_samples_of_a_placed_cube(bpy):
    from backend.blender_render import sample_surface, world_bounds

    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(1.0, -2.0, 0.5))
    cube = bpy.context.active_object
    cube.scale = (0.5, 1.0, 2.0)
    bpy.context.view_layer.update()

    bounds = world_bounds([cube])
    np.testing.assert_allclose(bounds, [[0.5, -3.0, -1.5], [1.5, -1.0, 2.5]], atol=1e-6)
    points, normals = sample_surface([cube], 3000, seed=0)
    assert points.shape == normals.shape == (3000, 3)
    # Every sample lies on a face of the box, with that face's outward axis as its normal.
    offset = (points - [1.0, -2.0, 0.5]) / [0.5, 1.0, 2.0]
    axis = np.abs(normals).argmax(axis=1)
    on_face = offset[np.arange(3000), axis]
    np.testing.assert_allclose(np.abs(on_face), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.sign(on_face), normals[np.arange(3000), axis], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    # Area-weighted: the box is 1 x 2 x 4, so the faces facing X, Y, Z hold 16, 8 and 4 of its 28 m^2.
    areas = {0: 2 * (2.0 * 4.0), 1: 2 * (1.0 * 4.0), 2: 2 * (1.0 * 2.0)}
    total = sum(areas.values())
    for face_axis, area in areas.items():
        assert np.mean(axis == face_axis) == pytest.approx(area / total, abs=0.03)


CUBE_OBJ = """mtllib cube.mtl
v -0.5 -0.5 0.0
v 0.5 -0.5 0.0
v 0.5 0.5 0.0
v -0.5 0.5 0.0
v -0.5 -0.5 1.0
v 0.5 -0.5 1.0
v 0.5 0.5 1.0
v -0.5 0.5 1.0
usemtl paint
f 1 4 3 2
f 5 6 7 8
f 1 2 6 5
f 2 3 7 6
f 3 4 8 7
f 4 1 5 8
"""
CUBE_MTL = "newmtl paint\nKd 0.8 0.3 0.1\nNs 100\n"


@pytest.mark.blender
def test_the_ground_truth_scored_against_itself_is_perfect(bpy, tmp_path, monkeypatch):
    """With a stand-in reconstruction that returns the asset itself, every metric must be at its best.

    This checks evaluate's own plumbing: the same cameras in both scenes, the OBJ+MTL path, the
    mask, the canonical mapping and the sheet, independent of any engine's quality.
    """
    import backend.reconstruct
    from backend.reconstruct import ReconstructionResult

    (tmp_path / "cube.mtl").write_text(CUBE_MTL)
    asset = tmp_path / "cube.obj"
    asset.write_text(CUBE_OBJ)

    def the_asset_itself(bundle, out, **kwargs):
        assert (bundle / "transforms.json").is_file()
        return ReconstructionResult(asset, {"total": 0.0}, [], math.inf, "cpu", "refine", "cpu", 4)

    monkeypatch.setattr(backend.reconstruct, "reconstruct", the_asset_itself)
    config = EvaluateConfig(preset="cpu", device="cpu", views=4, test_views=2, resolution=32, samples=4)
    report = evaluate([asset], tmp_path / "eval", config)

    record = report["assets"]["cube"]
    assert record["psnr_h"] == record["psnr_l"] == math.inf  # same mesh, cameras, lighting and Cycles seed
    assert record["ssim"] == pytest.approx(1.0)
    assert record["chamfer"] < 1e-6 and record["normal_error_deg"] == pytest.approx(0.0, abs=1e-3)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["assets"]["cube"]["psnr_l"] is None  # JSON has no infinity
    sheet = np.asarray(Image.open(tmp_path / "eval" / "sheet.png"))
    assert sheet.shape == (32, 96, 3)
    np.testing.assert_array_equal(sheet[:, 32:64], sheet[:, 64:])  # ours relit == ground truth relit
    assert not np.array_equal(sheet[:, :32], sheet[:, 64:])  # the input view is another view, other light


@pytest.mark.blender
@pytest.mark.slow
def test_evaluate_runs_end_to_end_on_a_small_synthetic_asset(bpy, tmp_path, monkeypatch):
    from backend.bundle import load_bundle
    from backend.data.synthetic import export_ground_truth

    asset = export_ground_truth(seed=3, out=tmp_path / "seed3.glb", resolution=48, texture_size=128, target_faces=2000)
    # A refinement budget below the cpu preset's: this checks the plumbing, not the quality.
    cpu = PRESETS["cpu"]
    tiny = replace(
        cpu,
        name="tiny",
        refine=replace(cpu.refine, prefit_steps=40, coarse_steps=40, fine_steps=30, rays_per_batch=256),
        resolution=64,
        texture_size=128,
        target_faces=2000,
    )
    monkeypatch.setitem(PRESETS, "tiny", tiny)
    config = EvaluateConfig(preset="tiny", device="cpu", views=6, test_views=2, resolution=48, samples=8)
    out = tmp_path / "eval"
    evaluate([asset], out, config)

    report = json.loads((out / "metrics.json").read_text())
    record = report["assets"]["seed3"]
    for key in ("psnr_h", "psnr_l", "ssim", "chamfer", "normal_error_deg"):
        assert math.isfinite(record[key]) and math.isfinite(report["mean"][key]), key
    # Valid ranges, not quality bars: this budget leaves a rough blob (measured: PSNR-L 4.6 dB, Chamfer 0.40).
    assert 0.0 < record["psnr_l"] < 60.0 and 0.0 < record["psnr_h"] < 80.0
    assert -1.0 <= record["ssim"] <= 1.0
    assert 0.0 < record["chamfer"] < 2.0 * math.sqrt(3.0)  # canonical units: the box's diagonal bounds it
    assert 0.0 <= record["normal_error_deg"] <= 180.0
    assert len(record["per_view"]) == 2
    assert all(seconds > 0.0 for seconds in record["timings"].values())
    assert set(record["timings"]) == {"render inputs s", "render test s", "reconstruct s", "score s"}

    # The bundle is what the add-on would send: known lighting, the asset's bounds, RGBA views.
    bundle = load_bundle(out / "seed3" / "bundle")
    assert len(bundle.names) == 6 and bundle.environment is not None and bundle.aabb is not None
    assert 0.02 < (bundle.masks > 0.5).float().mean() < 0.9
    sheet = Image.open(out / "sheet.png")
    assert sheet.size == (3 * 48, 48)
    assert len(list((out / "seed3" / "test" / "gt").glob("*.exr"))) == 2


@pytest.mark.blender
@pytest.mark.slow  # ~60 s on the shared CPU; the phase functions also run (fast) in the self-scoring test
def test_the_split_phases_score_a_reconstruction_made_elsewhere(bpy, tmp_path, monkeypatch, capsys):
    """inputs (CLI) -> reconstruct_prepared's record and GLB in a run folder -> score (CLI), on one small GLB.

    The stand-in reconstruction is the asset itself, so the scores must be perfect; a second asset whose
    reconstruction failed is reported under "failed" while the first is scored.
    """
    import shutil

    import backend.reconstruct
    from backend.data.synthetic import export_ground_truth
    from backend.evaluate import EvaluateConfig, reconstruct_prepared
    from backend.reconstruct import ReconstructionResult

    asset = export_ground_truth(seed=3, out=tmp_path / "seed3.glb", resolution=32, texture_size=64, target_faces=800)
    prepared, run = tmp_path / "prepared", tmp_path / "run" / "cpu"
    settings = ["--res", "32", "--views", "4", "--test-views", "2", "--samples", "4"]
    assert main(["evaluate", str(asset), str(asset), "--out", str(prepared), "--phase", "inputs", *settings]) == 0
    assert json.loads((prepared / "inputs.json").read_text())["assets"] == ["seed3", "seed3_2"]
    assert len(list((prepared / "seed3" / "bundle" / "images").glob("*.png"))) == 4
    assert not list(prepared.rglob("*.glb"))  # the inputs phase reconstructs nothing

    def the_asset_itself(bundle, out, **kwargs):
        assert bundle == prepared / "seed3" / "bundle" and kwargs["preset"] == "cpu"
        shutil.copyfile(asset, out)
        return ReconstructionResult(out, {"fine": 1.5, "total": 2.0}, ["a warning"], 30.0, "cpu", "refine", "cpu", 4)

    monkeypatch.setattr(backend.reconstruct, "reconstruct", the_asset_itself)
    run.mkdir(parents=True)
    record = reconstruct_prepared(prepared / "seed3", run / "seed3.glb", EvaluateConfig(preset="cpu", device="cpu"))
    assert record["preset"] == "cpu" and record["seconds"] > 0.0 and record["peak_gpu_memory_bytes"] is None
    (run / "seed3.json").write_text(json.dumps(record))
    (run / "seed3_2.json").write_text(json.dumps({"preset": "cpu", "error": "OutOfMemoryError: CUDA out of memory"}))

    assert main(["evaluate", "--out", str(prepared), "--phase", "score", "--reconstructions", str(run)]) == 0
    assert "seed3_2" in capsys.readouterr().err
    report = json.loads((run / "metrics.json").read_text())
    scored = report["assets"]["seed3"]
    assert scored["psnr_h"] is None and scored["psnr_l"] is None  # infinite: the same mesh, cameras and light
    assert scored["ssim"] == pytest.approx(1.0) and scored["chamfer"] < 1e-6
    assert report["failed"] == {"seed3_2": "OutOfMemoryError: CUDA out of memory"}
    assert report["settings"]["resolution"] == 32 and report["settings"]["preset"] == "cpu"
    assert scored["timings"]["reconstruct s"] == record["seconds"] and scored["warnings"] == ["a warning"]
    assert set(scored["timings"]) == {"render inputs s", "render test s", "reconstruct s", "score s"}
    assert len(list((run / "seed3" / "test" / "ours").glob("*.exr"))) == 2
    assert Image.open(run / "sheet.png").size == (3 * 32, 32)


def test_the_split_phases_refuse_mixed_arguments(tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path), "--phase", "score"]) == 2
    assert "--reconstructions" in capsys.readouterr().err
    assert main(["evaluate", "a.glb", "--out", str(tmp_path), "--phase", "score", "--reconstructions", "r"]) == 2
    assert "takes no ASSET" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path), "--phase", "inputs"]) == 2
    assert "no asset given" in capsys.readouterr().err


def test_devset_reconstruct_records_failures_and_needs_no_blender(tmp_path, monkeypatch):
    """The GPU phase as a process in which bpy cannot be imported: each broken bundle fails alone; late runs skip."""
    blocker = tmp_path / "no_blender"
    blocker.mkdir()
    (blocker / "bpy.py").write_text("raise ImportError('the reconstruct phase must not import bpy')\n")
    prepared, run = tmp_path / "prepared", tmp_path / "run"
    (prepared / "broken" / "bundle").mkdir(parents=True)
    (prepared / "broken" / "bundle" / "transforms.json").write_text("{not json")
    (prepared / "inputs.json").write_text(json.dumps({"assets": ["broken", "missing"], "settings": {}}))
    script = REPO / "bench" / "devset_reconstruct.py"
    command = [sys.executable, str(script), str(prepared), "--out", str(run), "--presets", "cpu", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("broken", "missing"):
        assert json.loads((run / "cpu" / f"{name}.json").read_text())["error"].startswith("InputError: "), name
    summary = json.loads((run / "cpu" / "summary.json").read_text())
    assert [(row["asset"], row["preset"]) for row in summary["rows"]] == [("broken", "cpu"), ("missing", "cpu")]

    # In-process (no second interpreter start): a deadline already passed starts nothing and says so,
    # and what an earlier call made (GLB + record) is kept, so a second call resumes.
    # A record made under other settings (here: none recorded, as before settings were) is made again.
    settings = reconstruction_settings(EvaluateConfig(preset="fast"))
    earlier = {"preset": "fast", "engine": "refine", "seconds": 31.0, "peak_gpu_memory_bytes": 2**30}
    earlier.update(timings={"coarse": 20.0, "total": 31.0}, training_psnr=30.0, settings=settings)
    (run / "fast").mkdir()
    (run / "fast" / "broken.json").write_text(json.dumps(earlier))
    (run / "fast" / "broken.glb").write_bytes(b"glTF")
    (run / "fast" / "missing.json").write_text(json.dumps({**earlier, "settings": None}))
    (run / "fast" / "missing.glb").write_bytes(b"glTF")
    spec = importlib.util.spec_from_file_location("devset_reconstruct", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", [*command[1:4], str(run), "--presets", "fast", "--deadline-s", "-1"])
    bench.main()
    assert "skipped" in json.loads((run / "fast" / "missing.json").read_text())["error"]
    assert json.loads((run / "fast" / "broken.json").read_text()) == earlier
    rows = json.loads((run / "fast" / "summary.json").read_text())["rows"]
    assert rows[0] == {"asset": "broken", **earlier, "glb": str(run / "fast" / "broken.glb")}
    assert "skipped" in rows[1]["error"]


def test_metrics_json_takes_paths_and_infinities():
    from backend.evaluate import _json_safe

    settings = {"checkpoint": Path("models/lsrm.safetensors"), "psnr": [math.inf, 20.0]}
    assert json.loads(json.dumps(_json_safe(settings))) == {
        "checkpoint": "models/lsrm.safetensors",
        "psnr": [None, 20.0],
    }

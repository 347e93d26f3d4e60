"""`reconstruct` and `python -m backend reconstruct`: bundle in, world-placed GLB out; bad input refused."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend import presets
from backend import reconstruct as reconstruct_module
from backend.bundle import load_bundle
from backend.cli import main
from backend.data.synthetic import write_synthetic_bundle
from backend.errors import InputError
from backend.gltf import Z_UP_TO_Y_UP
from backend.reconstruct import reconstruct
from backend.refine import Cancelled
from tests.conftest import REPO
from tests.test_export import accessor_array, read_glb
from tests.test_refine import TINY as TINY_REFINE

# Enough steps to leave the visual hull's surface in place, few enough for seconds on a CPU.
TINY = presets.Preset(
    name="tiny",
    refine=dataclasses.replace(TINY_REFINE, prefit_steps=40, prefit_points=1024),
    resolution=48,
    texture_size=64,
    target_faces=2000,
    budget="test only",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "object"
    write_synthetic_bundle(seed=1, views=6, resolution=32, environment=None, out=out)
    return out


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "tiny", TINY)


def _copy(bundle: Path, tmp_path: Path) -> tuple[Path, dict]:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy, json.loads((copy / "transforms.json").read_text())


def _save(copy: Path, meta: dict) -> None:
    (copy / "transforms.json").write_text(json.dumps(meta))


def _clear_alpha(path: Path) -> None:
    pixels = np.array(Image.open(path).convert("RGBA"))
    pixels[..., 3] = 0
    Image.fromarray(pixels).save(path)


def _world_vertices(path: Path) -> np.ndarray:
    gltf, blob = read_glb(path)
    positions = accessor_array(gltf, blob, gltf.meshes[0].primitives[0].attributes.POSITION)
    return (positions + np.array(gltf.nodes[0].translation)) @ Z_UP_TO_Y_UP  # glTF Y up back to Z up


def _check_world_placement(glb: Path, bundle: Path) -> None:
    vertices = _world_vertices(glb)
    assert len(vertices) > 100 and np.isfinite(vertices).all()
    aabb = load_bundle(bundle).aabb.numpy()
    size = float((aabb[1] - aabb[0]).max())
    # The surface sits inside the bundle's region and around its middle, where the object is.
    assert (vertices >= aabb[0] - 0.02 * size).all() and (vertices <= aabb[1] + 0.02 * size).all()
    middle = (vertices.min(0) + vertices.max(0)) / 2.0
    assert np.linalg.norm(middle - aabb.mean(0)) < 0.15 * size


def test_cli_writes_a_world_placed_glb_and_prints_timings(bundle, tmp_path, capsys, tiny_preset):
    out = tmp_path / "object.glb"
    assert main(["reconstruct", str(bundle), "--out", str(out), "--preset", "tiny", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "coarse" in printed and "total" in printed
    _check_world_placement(out, bundle)


def test_views_without_foreground_are_left_out_with_a_warning(bundle, tmp_path, capsys, tiny_preset):
    copy, meta = _copy(bundle, tmp_path)
    _clear_alpha(copy / meta["frames"][2]["file_path"])
    out = tmp_path / "object.glb"
    result = reconstruct(copy, out, preset="tiny", device="cpu")
    assert result.views_used == 5 and out.is_file()
    assert any("empty mask" in warning and "0002" in warning for warning in result.warnings)
    assert main(["reconstruct", str(copy), "--out", str(out), "--preset", "tiny", "--device", "cpu"]) == 0
    assert "warning: left out 1 views with an empty mask" in capsys.readouterr().err


def _turn_cameras_away(meta: dict) -> None:
    for frame in meta["frames"]:
        matrix = np.array(frame["transform_matrix"])
        matrix[:3, :3] = matrix[:3, :3] @ np.diag([-1.0, 1.0, -1.0])  # half a turn about the camera's up axis
        frame["transform_matrix"] = matrix.tolist()


def _one_view(meta: dict) -> None:
    meta["frames"] = meta["frames"][:1]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty masks", "every view's mask is empty"),
        (_one_view, "the bundle has 1 view"),
        (_turn_cameras_away, "cameras look at the region"),
    ],
)
def test_bad_bundles_exit_2_with_one_sentence_and_no_file(bundle, tmp_path, capsys, tiny_preset, damage, message):
    copy, meta = _copy(bundle, tmp_path)
    if damage == "empty masks":
        for frame in meta["frames"]:
            _clear_alpha(copy / frame["file_path"])
    else:
        damage(meta)
        _save(copy, meta)
    out = tmp_path / "object.glb"
    assert main(["reconstruct", str(copy), "--out", str(out), "--preset", "tiny", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1, error
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_unknown_preset_and_engine_are_refused_before_any_work(bundle, tmp_path):
    from backend.errors import InputError

    with pytest.raises(InputError, match="unknown preset 'huge'"):
        reconstruct(bundle, tmp_path / "a.glb", preset="huge")
    with pytest.raises(InputError, match="unknown engine 'magic'"):
        reconstruct(bundle, tmp_path / "a.glb", engine="magic")
    with pytest.raises(InputError, match=r"must end in \.glb"):
        reconstruct(bundle, tmp_path / "a.obj", preset="cpu")


def test_cancel_before_export_writes_nothing(bundle, tmp_path, tiny_preset):
    out = tmp_path / "object.glb"
    with pytest.raises(Cancelled):
        reconstruct(bundle, out, preset="tiny", device="cpu", should_stop=lambda: True)
    assert not out.exists()


def _collapsing(seeds_that_collapse: set[int], seen: list[int]):
    """refine as it is, except that runs with these seeds end with the whole box outside the surface."""
    original = reconstruct_module.refine

    def run(cameras, images, masks, config, **kwargs):
        seen.append(config.seed)
        result = original(cameras, images, masks, config, **kwargs)
        if config.seed in seeds_that_collapse:
            with torch.no_grad():
                result.field.decoder.geometry.bias[0] += 10.0  # SDF > 0 everywhere: no surface at all
            result.report.surface_coverage = 0.0
        return result

    return run


def test_a_collapsed_refinement_is_run_again_with_the_next_seed(bundle, tmp_path, tiny_preset, monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(reconstruct_module, "refine", _collapsing({0}, seen))
    result = reconstruct(bundle, tmp_path / "a.glb", preset="tiny", device="cpu")
    assert seen == [0, 1] and result.refine_report.surface_coverage >= reconstruct_module.MIN_SURFACE_COVERAGE
    assert any("collapsed" in warning for warning in result.warnings) and (tmp_path / "a.glb").stat().st_size > 0


def test_two_collapsed_refinements_are_an_error_and_write_nothing(bundle, tmp_path, tiny_preset, monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(reconstruct_module, "refine", _collapsing({0, 1}, seen))
    with pytest.raises(InputError, match="covers only 0% of the masks"):
        reconstruct(bundle, tmp_path / "a.glb", preset="tiny", device="cpu")
    assert seen == [0, 1] and not (tmp_path / "a.glb").exists()


def test_every_preset_states_its_budget():
    for name, preset in presets.PRESETS.items():
        assert preset.name == name and preset.budget and "\n" not in preset.budget
        config = preset.refine
        assert config.coarse_steps > 0 and config.sparse_resolution > config.dense_resolution
    assert "shortest refinement" in presets.PRESETS["fast"].budget
    order = ["fast", "standard", "high"]
    steps = [presets.PRESETS[n].refine.coarse_steps + presets.PRESETS[n].refine.fine_steps for n in order]
    assert steps == sorted(steps) and presets.PRESETS["high"].texture_size > presets.PRESETS["standard"].texture_size


@pytest.mark.slow
def test_cpu_preset_end_to_end_as_a_process(bundle, tmp_path):
    out = tmp_path / "object.glb"
    command = [sys.executable, "-m", "backend", "reconstruct", str(bundle), "--out", str(out), "--preset", "cpu"]
    result = subprocess.run([*command, "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(out)
    _check_world_placement(out, bundle)


def test_a_preset_variant_sets_typed_fields_and_names_itself(monkeypatch):
    monkeypatch.setattr(presets, "PRESETS", dict(presets.PRESETS))
    changed = presets.variant("fast", ["coarse_steps=7", "final_beta=None", "cuda_graphs=true", "weights.mask=0.5"])
    assert changed.name == "fast+" and presets.get_preset("fast+") is changed
    assert (changed.refine.coarse_steps, changed.refine.final_beta, changed.refine.cuda_graphs) == (7, None, True)
    assert changed.refine.weights.mask == 0.5
    assert changed.refine.weights.silhouette == presets.get_preset("fast").refine.weights.silhouette  # kept
    assert presets.variant("fast", []) is presets.get_preset("fast")
    wrongs = ("coarse_step=7", "coarse_steps=many", "cuda_graphs=maybe", "weights.nothing=1", "max_gradient_norm=0")
    for wrong in wrongs:
        with pytest.raises(InputError):
            presets.variant("fast", [wrong])


def test_a_benchmark_refuses_a_bad_setting_in_one_sentence() -> None:
    done = subprocess.run(
        [sys.executable, "bench/profile_refine.py", "--set", "coarse_steps=many"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: 'coarse_steps=many': 'many' is not an integer"

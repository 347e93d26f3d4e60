"""The development set: bench/devset.json is well formed and licensed; build_devset.py builds it."""

import json
import re
from pathlib import Path

import pytest

from backend.errors import InputError
from backend.shading import BUILTIN_ENVIRONMENTS
from scripts import build_devset

REPO = Path(__file__).resolve().parents[1]
LICENCES = ("CC0-1.0", "CC-BY-3.0")
SPEC = build_devset.load_spec()
PACKAGE_MISSING = not all((Path(SPEC["furniture_dir"]) / model["archive"]).is_file() for model in SPEC["furniture"])


def test_spec_lists_licensed_models_procedural_seeds_and_every_world():
    models = SPEC["furniture"]
    assert 10 <= len(models) <= 16
    assert all(model["licence"] in LICENCES for model in models)
    assert all(model["model"].endswith(".obj") for model in models)
    credits = (REPO / "docs" / "CREDITS.md").read_text(encoding="utf-8")
    for model in models:
        if model["licence"] != "CC0-1.0":  # attribution is a condition of CC-BY
            assert model["author"] in credits and model["source"] in credits
    assert len(SPEC["procedural"]["seeds"]) == len(set(SPEC["procedural"]["seeds"])) == 6
    assert sorted(SPEC["environments"]) == sorted(BUILTIN_ENVIRONMENTS)
    assert SPEC["lighting"]["input"] != SPEC["lighting"]["test"]


def test_spec_without_a_licence_is_refused(tmp_path):
    spec = json.loads(build_devset.DEFAULT_SPEC.read_text(encoding="utf-8"))
    del spec["furniture"][3]["licence"]
    path = tmp_path / "devset.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(InputError, match=r"furniture entry 3 lacks licence"):
        build_devset.load_spec(path)


def test_missing_package_says_how_to_install_it_and_writes_nothing(tmp_path):
    out = tmp_path / "devset"
    with pytest.raises(InputError, match=r"apt-get install sweethome3d-furniture"):
        build_devset.build_devset(out, furniture_dir=tmp_path / "nowhere", seeds=[])
    assert not out.exists()


def test_procedural_only_build_lists_glbs_and_worlds(tmp_path, capsys):
    out = tmp_path / "devset"
    tiny = ["--resolution", "32", "--texture-size", "64", "--target-faces", "0", "--device", "cpu"]
    assert build_devset.main(["--out", str(out), "--procedural-only", "--seeds", "3", *tiny]) == 0
    index = json.loads((out / "devset.json").read_text(encoding="utf-8"))
    assert [asset["name"] for asset in index["assets"]] == ["synthetic_3"]
    for asset in index["assets"]:
        path = Path(asset["path"])
        assert path.is_absolute() and path.read_bytes()[:4] == b"glTF"
    assert [world["name"] for world in index["environments"]] == SPEC["environments"]
    assert all(Path(world["path"]).is_file() for world in index["environments"])
    assert "python -m backend evaluate" in capsys.readouterr().out


@pytest.mark.skipif(PACKAGE_MISSING, reason="needs the Debian package: apt-get install sweethome3d-furniture")
def test_furniture_models_unpack_with_their_materials_textures_and_licence(tmp_path):
    out = tmp_path / "devset"
    build_devset.build_devset(out, seeds=[], progress=lambda stage, fraction: None)
    assets = json.loads((out / "devset.json").read_text(encoding="utf-8"))["assets"]
    assert [asset["name"] for asset in assets] == [model["name"] for model in SPEC["furniture"]]
    for asset in assets:
        obj = Path(asset["path"])
        libraries = re.findall(r"^mtllib\s+(.+?)\s*$", obj.read_text(encoding="latin-1"), re.M)
        assert libraries and all((obj.parent / name).is_file() for name in libraries)
        textures = [
            texture
            for name in libraries
            for texture in re.findall(r"^\s*map_Kd\s+(.+?)\s*$", (obj.parent / name).read_text("latin-1"), re.M)
        ]
        assert textures and all((obj.parent / texture).is_file() for texture in textures), asset["name"]
        assert any(re.search(r"licen[cs]e", path.name, re.I) for path in obj.parent.iterdir()), asset["name"]

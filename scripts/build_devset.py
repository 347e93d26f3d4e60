"""Build the development set of issue 3 into one folder (default out/devset/).

    python scripts/build_devset.py [--out out/devset] [--procedural-only] [--resolution N ...]

What it holds, as chosen in bench/devset.json:
- furniture/<name>/: textured OBJ + MTL + texture models (with their licence files) unpacked from
  the Debian package sweethome3d-furniture (`apt-get install sweethome3d-furniture`);
- procedural/synthetic_<seed>.glb: procedural objects exported exactly as `python -m backend
  export-gt` does (backend.data.synthetic.export_ground_truth);
- devset.json: absolute asset paths that `python -m backend evaluate` takes as they are, each asset's
  licence, and the eight studio worlds (backend.shading.builtin_environment) for lighting.
Nothing is rendered here: evaluate renders the assets itself. The folder is written all-or-nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

from backend.atomic import atomic_directory  # noqa: E402
from backend.errors import InputError  # noqa: E402
from backend.progress import Progress, TerminalProgress  # noqa: E402
from backend.shading import BUILTIN_ENVIRONMENTS, builtin_environment  # noqa: E402

DEFAULT_SPEC = REPO / "bench" / "devset.json"
DEFAULT_OUT = REPO / "out" / "devset"
APT_COMMAND = "sudo apt-get install sweethome3d-furniture"
# Files of a model folder worth copying: geometry, materials, textures, licence notes.
MODEL_SUFFIXES = (".obj", ".mtl", ".png", ".jpg", ".jpeg", ".txt", ".html")
FURNITURE_KEYS = ("name", "archive", "model", "author", "licence", "source", "why")
PROCEDURAL_KEYS = ("seeds", "resolution", "texture_size", "target_faces")


@dataclass(frozen=True)
class ExportSettings:
    """How finely each procedural object is meshed and baked (bench/devset.json, or overrides)."""

    resolution: int
    texture_size: int
    target_faces: int

    @staticmethod
    def from_spec(procedural: dict[str, Any], **overrides: int | None) -> ExportSettings:
        """The spec's settings, with every override that is not None in their place."""
        values = {key: procedural[key] for key in ("resolution", "texture_size", "target_faces")}
        values.update({key: value for key, value in overrides.items() if value is not None})
        return ExportSettings(**values)


# ----------------------------------------------------------------------------- the spec


def load_spec(path: Path = DEFAULT_SPEC) -> dict[str, Any]:
    """Read bench/devset.json and check every field this script and the credits rely on."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read the development-set spec '{path}' ({error}); fix or restore the file.") from None
    for key in ("furniture_dir", "furniture", "procedural", "environments", "lighting"):
        if key not in spec:
            raise InputError(f"{path}: key '{key}' is missing; add it (see the git history of bench/devset.json).")
    names = set()
    for index, model in enumerate(spec["furniture"]):
        missing = [key for key in FURNITURE_KEYS if not str(model.get(key, "")).strip()]
        if missing:
            raise InputError(f"{path}: furniture entry {index} lacks {', '.join(missing)}; fill them in.")
        if model["name"] in names:
            raise InputError(f"{path}: furniture name '{model['name']}' is used twice; give each model its own name.")
        names.add(model["name"])
    missing = [key for key in PROCEDURAL_KEYS if key not in spec["procedural"]]
    if missing:
        raise InputError(f"{path}: 'procedural' lacks {', '.join(missing)}; add them.")
    named = spec["environments"] + list(spec["lighting"].values())
    unknown = [name for name in named if name not in BUILTIN_ENVIRONMENTS]
    if unknown:
        raise InputError(f"{path}: unknown environments {unknown}; use names from {', '.join(BUILTIN_ENVIRONMENTS)}.")
    return spec


# ----------------------------------------------------------------------------- furniture


def furniture_archive(spec: dict[str, Any], archive: str, furniture_dir: Path | None = None) -> Path:
    """The package's .sh3f archive (a zip), or an InputError that says how to install the package."""
    path = Path(furniture_dir or spec["furniture_dir"]) / archive
    if not path.is_file():
        raise InputError(
            f"the furniture archive '{path}' is missing: the Debian package sweethome3d-furniture is not installed; "
            f"run `{APT_COMMAND}`, or build without it using --procedural-only."
        )
    return path


def extract_model(archive: Path, model: str, folder: Path) -> Path:
    """Unpack one model's folder (OBJ, MTL, textures, licence) from the archive; return the OBJ path.

    SweetHome3D keeps each model in a flat folder, so only file names are used, never archive paths
    (nothing can land outside `folder`).
    """
    inner = PurePosixPath(model).parent
    folder.mkdir(parents=True)
    with zipfile.ZipFile(archive) as bundle:
        members = [
            info
            for info in bundle.infolist()
            if PurePosixPath(info.filename).parent == inner and info.filename.lower().endswith(MODEL_SUFFIXES)
        ]
        for info in members:
            (folder / PurePosixPath(info.filename).name).write_bytes(bundle.read(info))
    obj = folder / PurePosixPath(model).name
    if not obj.is_file():
        raise InputError(f"'{model}' is not in '{archive}'; the package version differs, so fix bench/devset.json.")
    return obj


def build_furniture(
    spec: dict[str, Any], out: Path, furniture_dir: Path | None, progress: Progress
) -> list[dict[str, Any]]:
    assets = []
    models = spec["furniture"]
    for index, model in enumerate(models):
        archive = furniture_archive(spec, model["archive"], furniture_dir)
        obj = extract_model(archive, model["model"], out / "furniture" / model["name"])
        assets.append(
            {
                "name": model["name"],
                "kind": "furniture",
                "path": obj,
                "licence": model["licence"],
                "author": model["author"],
                "source": model["source"],
            }
        )
        progress("furniture", (index + 1) / len(models))
    return assets


# ----------------------------------------------------------------------------- procedural


def build_procedural(
    seeds: list[int], settings: ExportSettings, out: Path, device: str, progress: Progress
) -> list[dict[str, Any]]:
    from backend.data.synthetic import export_ground_truth
    from backend.device import pick_device

    assets, target = [], pick_device(device)
    for index, seed in enumerate(seeds):
        glb = export_ground_truth(
            seed=seed,
            out=out / "procedural" / f"synthetic_{seed}.glb",
            resolution=settings.resolution,
            texture_size=settings.texture_size,
            target_faces=settings.target_faces,
            device=target,
        )
        assets.append({"name": f"synthetic_{seed}", "kind": "procedural", "path": glb, "seed": seed})
        progress("procedural", (index + 1) / len(seeds))
    return assets


# ----------------------------------------------------------------------------- the whole set


def build_devset(
    out: Path = DEFAULT_OUT,
    spec_path: Path = DEFAULT_SPEC,
    *,
    procedural_only: bool = False,
    settings: ExportSettings | None = None,
    seeds: list[int] | None = None,
    furniture_dir: Path | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> Path:
    """Build the development set folder and return the path of its devset.json."""
    progress = progress or TerminalProgress()
    spec = load_spec(spec_path)
    settings = settings or ExportSettings.from_spec(spec["procedural"])
    seeds = spec["procedural"]["seeds"] if seeds is None else seeds
    if not procedural_only:  # fail before any work when the package is missing
        for model in spec["furniture"]:
            furniture_archive(spec, model["archive"], furniture_dir)
    out = Path(out).resolve()
    with atomic_directory(out) as folder:
        assets = [] if procedural_only else build_furniture(spec, folder, furniture_dir, progress)
        assets += build_procedural(seeds, settings, folder, device, progress)
        # Paths are written as they will be once the folder is in place.
        for asset in assets:
            asset["path"] = str(out / Path(asset["path"]).relative_to(folder))
        index = {
            "spec": str(Path(spec_path).resolve()),
            "assets": assets,
            "environments": [{"name": name, "path": str(builtin_environment(name))} for name in spec["environments"]],
            "lighting": spec["lighting"],
        }
        (folder / "devset.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return out / "devset.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default out/devset)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="model choice (default bench/devset.json)")
    parser.add_argument("--procedural-only", action="store_true", help="skip the furniture models")
    parser.add_argument("--furniture-dir", type=Path, default=None, help="where the .sh3f archives are")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="procedural seeds (default: the spec's)")
    parser.add_argument("--resolution", type=int, default=None, help="marching-cubes grid (default: the spec's)")
    parser.add_argument("--texture-size", type=int, default=None, help="texture size (default: the spec's)")
    parser.add_argument("--target-faces", type=int, default=None, help="face budget (default: the spec's)")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, mps or cpu")
    args = parser.parse_args(argv)
    try:
        settings = ExportSettings.from_spec(
            load_spec(args.spec)["procedural"],
            resolution=args.resolution,
            texture_size=args.texture_size,
            target_faces=args.target_faces,
        )
        index = build_devset(
            args.out,
            args.spec,
            procedural_only=args.procedural_only,
            settings=settings,
            seeds=args.seeds,
            furniture_dir=args.furniture_dir,
            device=args.device,
        )
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    assets = json.loads(index.read_text(encoding="utf-8"))["assets"]
    print(f"{index}: {len(assets)} assets; evaluate them with:")
    print("python -m backend evaluate " + " ".join(asset["path"] for asset in assets) + " --out out/eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the installable Blender extension zip: add-on + backend + kernels sources.

    python build_addon.py [--out-dir dist]

Validates and builds with the extension tool that ships inside the bpy wheel
(`blender_ext.py`), so no Blender binary is needed. Prints the path of the zip.
The zip's root is the add-on package (blender_addon/ plus the manifest); the backend and
kernels sources sit beside it as sub-folders, so the add-on can start `python -m backend`
from its own folder with the user's PyTorch-enabled Python.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
SOURCES = {"blender_addon": ".", "backend": "backend", "kernels": "kernels"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def extension_tool() -> Path:
    """The `blender_ext.py` command-line tool inside the installed bpy module."""
    try:
        import bpy
    except ImportError:
        sys.exit("error: the bpy module is needed to build the extension; run `make setup-test` first")

    tool = Path(bpy.utils.system_resource("SCRIPTS")) / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    if not tool.is_file():
        sys.exit(f"error: Blender's extension tool was not found at {tool}")
    return tool


def stage(directory: Path) -> None:
    """Lay out the extension sources in `directory`."""
    shutil.copy2(REPO / "blender_manifest.toml", directory / "blender_manifest.toml")
    for source, target in SOURCES.items():
        shutil.copytree(REPO / source, directory / target, ignore=IGNORE, dirs_exist_ok=True)


def build(out_dir: Path) -> Path:
    tool = extension_tool()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lsrm-addon-") as staging:
        staging = Path(staging)
        stage(staging)
        run = [sys.executable, str(tool)]
        subprocess.run([*run, "validate", str(staging)], check=True)
        subprocess.run([*run, "build", "--source-dir", str(staging), "--output-dir", str(out_dir)], check=True)
    zips = sorted(out_dir.glob("lsrm_reconstruct-*.zip"), key=lambda path: path.stat().st_mtime)
    return zips[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "dist", help="where the zip goes (default dist/)")
    args = parser.parse_args()
    print(build(args.out_dir))


if __name__ == "__main__":
    main()

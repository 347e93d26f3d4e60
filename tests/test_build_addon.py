"""The extension zip builds and validates with Blender's own extension tool."""

import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.mark.blender
def test_build_addon_zip(tmp_path):
    pytest.importorskip("bpy")
    result = subprocess.run(
        [sys.executable, "build_addon.py", "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + result.stdout
    zip_path = tmp_path / result.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    assert zip_path.is_file()
    names = set(zipfile.ZipFile(zip_path).namelist())
    assert {"blender_manifest.toml", "__init__.py", "backend/cameras.py", "kernels/__init__.py"} <= names
    assert not any("__pycache__" in name for name in names)

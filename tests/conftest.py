"""Shared test setup: the slow marker switch, and headless Blender through the bpy module.

bpy is imported once per process (it cannot be re-imported); each Blender test starts from an
empty scene. Its user resources live in a temporary folder so tests never touch a real profile.
"""

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="lsrm-blender-user-"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("LSRM_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def bpy():
    """The bpy module with an empty scene (factory settings, no user preferences)."""
    bpy = pytest.importorskip("bpy")
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    return bpy

"""The committed demo data (demo/): loads cleanly, is consistent with itself, is small, is credited.

Fast and without bpy: it checks the files scripts/make_demo_bundle.py wrote, not the renderer.
"""

import json
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
import torch
import torch.nn.functional as F

from backend.bundle import load_bundle
from backend.cameras import project
from scripts.build_devset import load_spec
from scripts.make_demo_bundle import GT_SURFACE, DemoConfig

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
MAX_DEMO_BYTES = 5 * 2**20
FOREGROUND_RANGE = (0.05, 0.80)  # share of each view the object covers
CONFIG = DemoConfig()


@pytest.fixture(scope="module")
def bundles():
    return load_bundle(DEMO / "input"), load_bundle(DEMO / "test")


def test_bundles_load_with_the_configured_views_and_lighting(bundles):
    inputs, test = bundles
    render = CONFIG.render
    assert len(inputs.names) == render.views and len(test.names) == render.test_views
    for bundle in bundles:
        assert (bundle.cameras.width, bundle.cameras.height) == (render.resolution, render.resolution)
        assert bundle.aabb is not None and bundle.environment is not None
        assert torch.isfinite(bundle.images).all()
    assert inputs.environment.path.name == f"{render.input_environment}.exr"
    assert test.environment.path.name == f"{render.test_environment}.exr"
    assert inputs.environment.path.read_bytes() != test.environment.path.read_bytes()  # relit, not novel-view
    assert torch.equal(inputs.aabb, test.aabb)


def test_every_view_shows_the_whole_object(bundles):
    for bundle in bundles:
        foreground = (bundle.masks >= 0.5).float().mean(dim=(1, 2))
        assert ((foreground > FOREGROUND_RANGE[0]) & (foreground < FOREGROUND_RANGE[1])).all(), foreground
        border = torch.cat([bundle.masks[:, 0], bundle.masks[:, -1], bundle.masks[:, :, 0], bundle.masks[:, :, -1]], 1)
        assert border.max() == 0.0  # nothing cut off at the image edge


def test_test_cameras_are_new_viewpoints(bundles):
    inputs, test = bundles
    distances = torch.cdist(test.cameras.centres, inputs.cameras.centres)
    radius = inputs.cameras.centres.norm(dim=-1).mean()
    assert distances.min() > 0.05 * radius


def test_ground_truth_surface_projects_onto_the_masks(bundles):
    """Cameras, masks and the GT surface agree: surface points land on the silhouettes in every view."""
    surface = np.load(DEMO / "test" / GT_SURFACE)
    assert surface.dtype == np.float32 and surface.shape == (CONFIG.surface_samples, 6)
    assert np.isfinite(surface).all()
    np.testing.assert_allclose(np.linalg.norm(surface[:, 3:], axis=1), 1.0, atol=1e-4)
    points = torch.from_numpy(surface[:, :3])
    for bundle in bundles:
        assert ((points >= bundle.aabb[0] - 1e-4) & (points <= bundle.aabb[1] + 1e-4)).all()
        uv, depth = project(bundle.cameras, points)
        assert (depth > 0).all()
        columns = uv[..., 0].long().clamp(0, bundle.cameras.width - 1)
        rows = uv[..., 1].long().clamp(0, bundle.cameras.height - 1)
        views = torch.arange(len(bundle.names))[:, None]
        # One pixel of tolerance: points on the rim fall on the silhouette's anti-aliased edge.
        silhouettes = F.max_pool2d(bundle.masks[:, None], 3, stride=1, padding=1)[:, 0]
        assert (silhouettes[views, rows, columns] > 0.5).float().mean() > 0.999


def test_hdr_ground_truth_matches_the_png_views():
    """The linear EXR of each test view is the same render as its PNG (premultiplied, more precise)."""
    meta = json.loads((DEMO / "test" / "transforms.json").read_text(encoding="utf-8"))
    test = load_bundle(DEMO / "test")
    for index, frame in enumerate(meta["frames"]):
        with OpenEXR.File(str(DEMO / "test" / frame["hdr_path"]), separate_channels=True) as exr:
            channels = {name: channel.pixels for name, channel in exr.channels().items()}
        hdr = torch.from_numpy(np.stack([channels[c] for c in "RGBA"], axis=-1).astype(np.float32))
        assert hdr.shape == (test.cameras.height, test.cameras.width, 4)
        assert torch.isfinite(hdr).all() and (hdr >= 0).all()
        torch.testing.assert_close(hdr[..., 3], test.masks[index], atol=1 / 255, rtol=0)
        inside = test.masks[index] > 0.99
        straight = hdr[..., :3][inside] / hdr[..., 3:][inside]
        png = test.images[index][inside]
        # load_bundle decodes the 8-bit sRGB PNG to linear: it matches wherever the PNG did not clip.
        unclipped = straight.max(dim=-1).values < 1.0
        assert unclipped.float().mean() > 0.5
        torch.testing.assert_close(png[unclipped], straight[unclipped], atol=0.01, rtol=0)


def test_demo_is_small_and_credited():
    size = sum(path.stat().st_size for path in DEMO.rglob("*") if path.is_file())
    assert size < MAX_DEMO_BYTES, f"demo/ holds {size / 2**20:.2f} MiB"
    model = next(entry for entry in load_spec()["furniture"] if entry["name"] == CONFIG.model)
    assert model["licence"] == "CC0-1.0"
    for credits in (DEMO / "CREDITS.md", REPO / "docs" / "CREDITS.md"):
        text = credits.read_text(encoding="utf-8")
        for value in (model["title"], model["author"], model["source"], "CC0"):
            assert value in text, f"{credits} does not mention {value!r}"

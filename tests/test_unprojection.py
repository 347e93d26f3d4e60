"""The unprojection (ModelConfig.unproject, docs/TRAINING.md "Why colour did not learn, part 2"): volume tokens
and dense voxels read the views at their projections, and checkpoints from before the flag keep loading."""

from __future__ import annotations

import dataclasses

import torch

from backend.cameras import project
from backend.data.synthetic import sample_scene
from backend.model.config import CONFIGS, ModelConfig
from backend.model.lsrm import LSRM, Views, unprojected


def test_unprojected_reads_each_view_at_the_projection_and_averages() -> None:
    size, patch = 64, 8
    cameras = sample_scene(3, 2, size).canonical_cameras
    # Token (row, col) holds its patch centre's pixel position (x, y): bilinear reads then return the
    # projected position itself, so the expected value is known exactly.
    cells = (torch.arange(size // patch, dtype=torch.float32) + 0.5) * patch
    x, y = torch.meshgrid(cells, cells, indexing="xy")
    tokens = torch.stack([x, y], dim=-1).expand(1, 2, -1, -1, -1)  # [B, V, h, w, 2]
    points = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.05, 0.08], [-0.1, 0.1, 0.0]])
    pixels, depth = project(cameras, points)
    assert (depth > 0).all() and ((pixels > patch) & (pixels < size - patch)).all()  # inside, off the border
    read = unprojected(tokens, [cameras], points)[0]
    assert torch.allclose(read, pixels.mean(0), atol=1e-3)


def test_a_point_no_view_sees_reads_zero() -> None:
    camera = sample_scene(3, 1, 64).canonical_cameras
    behind = camera.centres * 3.0  # behind the camera, which looks at the object near the origin
    assert (project(camera, behind)[1] < 0).all()
    seen = unprojected(torch.ones(1, 1, 8, 8, 4), [camera], behind)
    assert torch.equal(seen, torch.zeros(1, 1, 4))


def test_the_input_colour_reaches_the_dense_volume_of_a_fresh_model() -> None:
    # Without the unprojection the colour reaches the volume only through attention that starts uniform
    # (docs/TRAINING.md: 3.5% of the volume for a red / blue object); with it, every voxel a view sees gets
    # the colour through one linear layer, and the image tokens seen there through another.
    torch.manual_seed(0)
    cameras = sample_scene(3, 4, 64).canonical_cameras
    masks = torch.ones(1, 4, 64, 64)

    def dense(config: ModelConfig, colour: tuple[float, float, float]) -> torch.Tensor:
        views = Views(torch.tensor(colour).expand(1, 4, 64, 64, 3).clone(), masks, [cameras])
        with torch.no_grad():
            return model_for(config)(views, stages=1).dense_fields[0].dense

    models: dict[bool, LSRM] = {}

    def model_for(config: ModelConfig) -> LSRM:
        if config.unproject not in models:
            torch.manual_seed(0)
            models[config.unproject] = LSRM(config)
        return models[config.unproject]

    change = {}
    for flag in (False, True):
        config = dataclasses.replace(CONFIGS["tiny"], unproject=flag, colour_skip=False)  # the unprojection alone
        red, blue = dense(config, (0.6, 0.05, 0.05)), dense(config, (0.05, 0.05, 0.6))
        change[flag] = float((red - blue).norm() / red.norm())
    assert change[True] > 2 * change[False], change  # measured: 0.40 against 0.15


def test_old_configs_keep_loading_without_the_unprojection() -> None:
    # A checkpoint's config JSON from before the flag has no "unproject" key: it must mean the old model.
    values = dataclasses.asdict(CONFIGS["tiny"])
    del values["unproject"], values["colour_skip"]  # the colour skip came later still
    old = ModelConfig(**values)
    assert not old.unproject
    model = LSRM(old)
    assert model.dense.unproject is None and model.dense.unproject_colour is None
    assert not any("unproject" in name for name in model.state_dict())

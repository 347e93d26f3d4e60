"""The colour skip (ModelConfig.colour_skip, docs/TRAINING.md "Why colour did not learn, part 3"): the albedo sees
the input colours' hue at full gain from the start, on the toy task it stays that way while training, and models and
fields without the flag are what they were."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backend.colour import linear_to_srgb
from backend.data.synthetic import sample_scene
from backend.field import FeatureField, FieldConfig, GridField
from backend.model.config import CONFIGS, ModelConfig
from backend.model.lsrm import LSRM, Views
from bench.colour_toy import ToyTask, train

RED, BLUE = (0.6, 0.05, 0.05), (0.05, 0.05, 0.6)  # linear; sRGB 0.80 and 0.25


@pytest.fixture(autouse=True)
def one_thread():
    """These small models ran up to fifty times slower with two OpenMP threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


POINTS = (torch.rand(256, 3, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.4  # near the origin


def predicted_field(model: LSRM, colour: tuple[float, float, float]) -> GridField:
    """The stage-1 field a model predicts from 4 views that see one uniform colour everywhere."""
    cameras = sample_scene(3, 4, 64).canonical_cameras
    views = Views(torch.tensor(colour).expand(1, 4, 64, 64, 3).clone(), torch.ones(1, 4, 64, 64), [cameras])
    with torch.no_grad():
        return model(views, stages=1).dense_fields[0]


def mean_albedo(model: LSRM, colour: tuple[float, float, float]) -> torch.Tensor:
    """The sRGB mean albedo a model predicts near the origin from views of one uniform colour."""
    field = predicted_field(model, colour)
    with torch.no_grad():
        return linear_to_srgb(field(POINTS).albedo).mean(0)


def test_a_fresh_model_with_the_skip_sees_hue_and_one_without_does_not() -> None:
    difference = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = LSRM(dataclasses.replace(CONFIGS["tiny"], colour_skip=flag))
        red, blue = mean_albedo(model, RED), mean_albedo(model, BLUE)
        difference[flag] = (red[0] - red[2]) - (blue[0] - blue[2])  # red-minus-blue hue, red input against blue
    # Measured: 1.19 with the skip (the sRGB inputs differ by 1.10), 0.0001 without (docs/TRAINING.md, part 2).
    assert difference[True] > 0.9, difference
    assert abs(difference[False]) < 0.01, difference


def test_the_skip_needs_the_unprojection() -> None:
    with pytest.raises(ValueError, match="colour_skip"):
        dataclasses.replace(CONFIGS["tiny"], unproject=False, colour_skip=True)


def test_old_configs_and_refinement_fields_have_no_skip() -> None:
    # A checkpoint's config from before the flag has no "colour_skip" key: it must load as the old model.
    values = dataclasses.asdict(CONFIGS["tiny"])
    del values["colour_skip"]
    old = LSRM(ModelConfig(**values))
    assert old.decoder.colour is None and not any("decoder.colour" in name for name in old.state_dict())
    # Refinement builds its fields from FieldConfig, whose default keeps the decoder as it was.
    assert FeatureField(FieldConfig(dense_resolution=8, sparse_resolution=16)).decoder.colour is None
    assert all(CONFIGS[name].colour_skip for name in ("tiny", "small", "paper"))


def test_a_refinement_started_from_the_model_keeps_the_skip() -> None:
    # `--engine both`: Engine B continues Engine A's field, decoder included, so it starts from the same colours.
    torch.manual_seed(0)
    predicted = predicted_field(LSRM(CONFIGS["tiny"]), RED).detached()
    refinable = predicted.to_feature_field()
    assert refinable.decoder.colour is not None
    with torch.no_grad():
        assert torch.allclose(refinable(POINTS).albedo, predicted(POINTS).albedo, atol=1e-6)


def test_the_skip_keeps_the_other_weights_of_a_seed() -> None:
    # The toy task compares the two models from the same initial transformer: only the colour path may differ.
    models = {}
    for flag in (False, True):
        torch.manual_seed(0)
        models[flag] = LSRM(dataclasses.replace(CONFIGS["tiny"], colour_skip=flag)).state_dict()
    changed = [name for name, value in models[False].items() if not torch.equal(value, models[True][name])]
    assert set(changed) == {"dense.unproject_colour.weight", "dense.unpatchify.weight"}  # their biases start at 0
    assert set(models[True]) - set(models[False]) == {"decoder.colour.weight", "decoder.colour.bias"}


def test_on_the_toy_task_the_skip_learns_colour_and_the_old_model_learns_grey() -> None:
    # bench/colour_toy.py in small: 40 steps of the albedo-on-the-surface loss, the same seeds for both models.
    task = ToyTask(32)
    scores = {}
    for flag in (False, True):
        config = dataclasses.replace(CONFIGS["tiny"], image_size=32, colour_skip=flag)
        scores[flag] = train(task, config, seed=0, report=[40])[-1]
    assert scores[True]["hue"]["slope"] > 0.6, scores[True]
    assert abs(scores[False]["hue"]["slope"]) < 0.1, scores[False]
    assert scores[True]["mean_colour_psnr"] > scores[False]["mean_colour_psnr"] + 5.0


def test_a_model_trained_without_the_skip_continues_with_it() -> None:
    # `train --init` of a checkpoint from before the flag: its transformer weights carry over, the colour path starts
    # as in a fresh model, so it sees hue at once.
    torch.manual_seed(0)
    old = LSRM(dataclasses.replace(CONFIGS["tiny"], colour_skip=False))
    upgraded = old.with_colour_skip()
    assert upgraded.config == CONFIGS["tiny"] and upgraded.with_colour_skip() is upgraded
    before, after = old.state_dict(), upgraded.state_dict()
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert set(changed) == {"dense.unproject_colour.weight", "dense.unpatchify.weight"}
    red, blue = mean_albedo(upgraded, RED), mean_albedo(upgraded, BLUE)
    assert (red[0] - red[2]) - (blue[0] - blue[2]) > 0.9

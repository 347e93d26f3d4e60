"""The shipped-checkpoint plumbing and the training rays of picked pixels."""

from __future__ import annotations

import torch

from backend import feedforward
from backend.cameras import image_rays, picked_pixel_rays
from backend.cli import build_parser, main
from backend.data.synthetic import sample_scene
from backend.model.checkpoint import save_checkpoint
from backend.model.config import CONFIGS
from backend.model.lsrm import LSRM


def test_the_default_checkpoint_is_used_when_installed_and_none_turns_it_off(tmp_path, monkeypatch) -> None:
    default = tmp_path / "assets" / "lsrm_small.safetensors"
    monkeypatch.setattr(feedforward, "DEFAULT_CHECKPOINT", default)
    assert feedforward.checkpoint_choice(None) is None  # not installed: no model
    default.parent.mkdir()
    save_checkpoint(LSRM(CONFIGS["tiny"]), default)  # a tiny random model stands in for the shipped one
    assert feedforward.checkpoint_choice(None) == default
    assert feedforward.checkpoint_choice("none") is None and feedforward.checkpoint_choice("NONE") is None
    assert feedforward.checkpoint_choice(str(tmp_path / "x.safetensors")) == tmp_path / "x.safetensors"
    assert feedforward.load_model(feedforward.checkpoint_choice(None), "cpu").config == CONFIGS["tiny"]


def test_every_model_command_takes_checkpoint_none(tmp_path, capsys) -> None:
    for command in (["reconstruct", "b", "--out", "x.glb"], ["serve"], ["demo"], ["evaluate", "a.obj", "--out", "o"]):
        assert build_parser().parse_args([*command, "--checkpoint", "none"]).checkpoint == "none"
    # a missing bundle fails with one sentence after the checkpoint was resolved to none
    assert (
        main(["reconstruct", str(tmp_path / "missing"), "--out", str(tmp_path / "x.glb"), "--checkpoint", "none"]) == 2
    )


def test_picked_pixel_rays_equal_the_full_images_rays() -> None:
    cameras = sample_scene(3, 5, 24).canonical_cameras.resized(24, 20)
    origins, directions = image_rays(cameras)
    picked = torch.randint(0, origins[..., 0].numel(), (300,), generator=torch.Generator().manual_seed(0))
    picked_origins, picked_directions = picked_pixel_rays(cameras, picked)
    torch.testing.assert_close(picked_origins, origins.reshape(-1, 3)[picked])
    torch.testing.assert_close(picked_directions, directions.reshape(-1, 3)[picked])

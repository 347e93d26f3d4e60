"""The scene producer (`train --prefetch N`): the inline pool's scenes, no process left behind, clear errors."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import backend.train
from backend.cli import main
from backend.data.prefetch import Prefetcher
from backend.data.sources import SourceSpec
from backend.data.views import ScenePool

from .test_train import TINY_RUN

SPEC = SourceSpec("synthetic", views=4, resolution=16, device="cpu", environments=("studio", "forest"))
BASE = 5_000_000
BROKEN = BASE + 2


@dataclasses.dataclass(frozen=True)
class BrokenSpec(SourceSpec):
    """The synthetic source, except that seed BROKEN raises (or, with `exit`, ends the process)."""

    exit: bool = False

    def build(self, bank):
        make = super().build(bank)

        def broken(seed: int):
            if seed == BROKEN and self.exit:
                os._exit(3)
            if seed == BROKEN:
                raise ValueError("this scene cannot be made")
            return make(seed)

        return broken


def assert_same(a, b) -> None:
    assert a.name == b.name and a.buffers.keys() == b.buffers.keys()
    assert torch.equal(a.cameras.c2w, b.cameras.c2w) and torch.equal(a.cameras.intrinsics, b.cameras.intrinsics)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
    assert a.environment.image is b.environment.image  # the bank's world itself, not a copy
    assert a.environment.rotation_z == b.environment.rotation_z
    points = torch.rand(256, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(a.truth.sdf(points), b.truth.sdf(points))
    assert torch.equal(a.truth(points).albedo, b.truth(points).albedo)


def test_prefetched_pool_holds_the_same_scenes_as_the_inline_one() -> None:
    bank = SPEC.bank()
    inline = ScenePool(SPEC.build(bank), size=3, every=2, base=BASE)
    start = 3  # a resumed run: the producer starts at the pool's lowest seed then
    prefetched = ScenePool(SPEC.build(bank), size=3, every=2, base=BASE)
    with Prefetcher(SPEC, prefetched.first_seed(start), 2, bank) as prefetcher:
        prefetched.make = prefetcher
        for step in range(start, start + 8):  # four refreshes: every slot re-made at least once
            for a, b in zip(inline.at_step(step), prefetched.at_step(step), strict=True):
                assert_same(a, b)
        assert prefetcher.next_seed == prefetched.first_seed(start + 7) + 3
        prefetched.slots.clear()
    assert not prefetcher.process.is_alive()


def test_a_producer_error_names_the_seed() -> None:
    spec = BrokenSpec(**dataclasses.asdict(SPEC))
    pool = ScenePool(lambda seed: None, size=2, every=1, base=BASE)
    with Prefetcher(spec, BASE, 2, spec.bank(), timeout=60) as prefetcher:
        pool.make = prefetcher
        pool.at_step(0)  # BASE and BASE + 1, sent before the producer failed
        with pytest.raises(RuntimeError, match=f"failed on seed {BROKEN}:(.|\n)*this scene cannot be made"):
            pool.at_step(1)
        pool.slots.clear()
    assert not prefetcher.process.is_alive()


def test_a_producer_that_dies_is_reported_not_waited_for() -> None:
    spec = BrokenSpec(**dataclasses.asdict(SPEC), exit=True)
    with Prefetcher(spec, BROKEN, 2, spec.bank(), timeout=60) as prefetcher:
        with pytest.raises(RuntimeError, match=rf"died \(exit code 3\) before sending seed {BROKEN}"):
            prefetcher(BROKEN)
    assert not prefetcher.process.is_alive()


@pytest.mark.parametrize("fail", [False, True])
def test_training_with_prefetch_leaves_no_process(tmp_path, monkeypatch, fail: bool) -> None:
    started: list[Prefetcher] = []

    class Recorded(Prefetcher):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(backend.train, "Prefetcher", Recorded)
    if fail:  # an error in the middle of training (Ctrl-C takes the same way out)

        def failing(*args, **kwargs):
            raise RuntimeError("a step went wrong")

        monkeypatch.setattr(backend.train, "batch_loss", failing)
    small = ["--batch", "1", "--pool", "2", "--inputs", "2", "2", "--targets", "1", "--eval-every", "0"]
    arguments = ["train", "--out", str(tmp_path / "run"), *TINY_RUN.split(), *small, "--steps", "3"]
    arguments += ["--refresh-every", "1", "--prefetch", "2"]
    if fail:
        with pytest.raises(RuntimeError, match="a step went wrong"):
            main(arguments)
    else:
        assert main(arguments) == 0
        assert (tmp_path / "run" / "state.json").is_file()
    assert len(started) == 1 and started[0].process.exitcode is not None
    assert not Path(f"/proc/{started[0].process.pid}").exists()  # gone, and reaped


def test_prefetch_settings_are_checked(tmp_path, capsys) -> None:
    arguments = ["train", "--out", str(tmp_path / "run"), *TINY_RUN.split(), "--data", "folder", "--prefetch", "2"]
    assert main(arguments) == 2
    assert "--prefetch" in capsys.readouterr().err

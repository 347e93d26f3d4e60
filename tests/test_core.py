"""The small shared pieces: colour conversion, atomic outputs, progress, device choice, `info`."""

import io
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from backend.atomic import atomic_directory, atomic_file
from backend.colour import linear_to_srgb, srgb_to_linear
from backend.device import pick_device
from backend.errors import InputError
from backend.progress import TerminalProgress
from tests.conftest import REPO


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=64))
def test_srgb_round_trip(values):
    x = torch.tensor(values, dtype=torch.float64)
    assert torch.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-9)
    assert torch.allclose(srgb_to_linear(linear_to_srgb(x)), x, atol=1e-9)


def test_srgb_known_values():
    # Mid-grey 0.5 sRGB is 0.2140 linear; the curve is continuous at its knee.
    assert srgb_to_linear(torch.tensor(0.5)).item() == pytest.approx(0.21404, abs=1e-5)
    knee = torch.tensor([0.04045 - 1e-7, 0.04045 + 1e-7], dtype=torch.float64)
    low, high = srgb_to_linear(knee)
    assert abs(high - low) < 1e-6


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.glb"
    with pytest.raises(RuntimeError), atomic_file(target) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as partial:
        partial.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.glb"]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "bundle"
    with atomic_directory(target) as partial:
        (partial / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(target) as partial:
        (partial / "b.txt").write_text("second")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_terminal_progress_writes_stages():
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    for stage in ("render", "write"):
        for i in range(3):
            progress(stage, i / 2)
    text = stream.getvalue()
    assert "render" in text and "write" in text and "100%" in text


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(InputError, match="unknown device"):
        pick_device("tpu")


def test_info_command_prints_versions_and_device():
    result = subprocess.run(
        [sys.executable, "-m", "backend", "info", "--json"], cwd=REPO, capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout)
    assert report["torch"] == torch.__version__
    assert report["device"] in {"cpu", "cuda", "mps"}
    assert report["free_memory_bytes"] > 0


def test_cli_bad_device_is_one_sentence_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "backend", "info", "--device", "cuda"], cwd=REPO, capture_output=True, text=True
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr

"""Engine A: the LSRM transformer's field for a bundle's views, in one forward pass (DESIGN §4).

Models are loaded from safetensors checkpoints once per process and reused (the service keeps one
warm). On CUDA the forward runs in bf16 autocast; the returned field is float32 and detached, ready
for export or as the start of a refinement (`--engine both`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cameras import Cameras, image_rays
from .errors import InputError
from .field import GridField
from .model.checkpoint import load_checkpoint
from .model.lsrm import LSRM, Views
from .progress import Progress, no_progress
from .shading import Environment

_LOADED: dict[tuple[str, int, str], LSRM] = {}  # (path, modification time, device) -> model
# The shipped checkpoint's place (docs/TRAINING.md): used whenever it exists and no other is named.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "models" / "lsrm_small.safetensors"


def checkpoint_choice(argument: str | Path | None) -> Path | None:
    """The checkpoint a `--checkpoint` argument means: a path; "none" for no model (the refinement alone);
    not given (None): the shipped default when it is installed, else no model."""
    if argument is None:
        return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None
    if str(argument).lower() == "none":
        return None
    return Path(argument)


def load_model(checkpoint: Path | str | None, device: torch.device | str) -> LSRM:
    """The model of a checkpoint on `device`, loaded once per process (a changed file is reloaded)."""
    if checkpoint is None:
        raise InputError(
            "the feed-forward engine needs a trained checkpoint: pass --checkpoint PATH to a .safetensors file, "
            "or use --engine refine, which needs none."
        )
    path = Path(checkpoint).resolve()
    key = (str(path), path.stat().st_mtime_ns if path.exists() else 0, str(device))
    if key not in _LOADED:
        for old in [k for k in _LOADED if k[0] == key[0] and k[2] == key[2]]:
            del _LOADED[old]  # one version of a file per device
        _LOADED[key] = load_checkpoint(path, device)
    return _LOADED[key]


def background_images(cameras: Cameras, environment: Environment) -> torch.Tensor:
    """What each camera would see of the environment alone, [V, H, W, 3] linear (LIRM's background input)."""
    _, directions = image_rays(cameras)
    return environment.radiance(directions)


@torch.no_grad()
def predict(
    model: LSRM,
    cameras: Cameras,
    images: torch.Tensor,
    masks: torch.Tensor,
    environment: Environment | None = None,
    progress: Progress = no_progress,
) -> GridField:
    """The field of one object from its views: cameras in the canonical frame on the model's device,
    images [V, H, W, 3] linear, masks [V, H, W]. Known lighting becomes the background input."""
    device = next(model.parameters()).device
    background = background_images(cameras, environment)[None] if environment is not None else None
    views = Views(images.to(device)[None], masks.to(device)[None], [cameras], background)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        prediction = model(views, progress=progress)
    return prediction.fields[0].detached()

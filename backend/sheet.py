"""The one comparison-sheet writer (evaluate's sheet.png, the demo's comparison.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import atomic_file
from .metrics import tone_map

BACKGROUND = 0.18  # linear grey behind the objects (sRGB ~0.46)


def display(rgba: torch.Tensor | np.ndarray, background: float = BACKGROUND, size: tuple[int, int] | None = None):
    """Premultiplied linear RGBA [H, W, 4] over a grey, tone-mapped (clip + sRGB) to uint8 [H, W, 3].

    With size (height, width), the image is first area-resampled to it.
    """
    pixels = torch.as_tensor(rgba, dtype=torch.float32)
    if size is not None and tuple(pixels.shape[:2]) != tuple(size):
        pixels = F.interpolate(pixels.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
    over = pixels[..., :3] + (1.0 - pixels[..., 3:].clamp(0.0, 1.0)) * background
    return (tone_map(over) * 255.0 + 0.5).to(torch.uint8).numpy()


def write_sheet(path: Path, rows: list[list[torch.Tensor | np.ndarray]], background: float = BACKGROUND) -> None:
    """A PNG of rows of premultiplied linear RGBA cells [H, W, 4], each shown at the size of the first row's last."""
    size = tuple(rows[0][-1].shape[:2])
    sheet = np.concatenate([np.concatenate([display(cell, background, size) for cell in row], axis=1) for row in rows])
    with atomic_file(path) as partial:
        Image.fromarray(sheet).save(partial, format="PNG")

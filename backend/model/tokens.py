"""Tokenisers: image patches with their Plücker rays (LSRM eq. 3) and factorised volume positions (eq. 4)."""

from __future__ import annotations

import torch
from torch import nn


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[..., H, W, C] -> [..., H/p, W/p, p*p*C] non-overlapping p x p patches, row-major inside a patch."""
    *lead, height, width, channels = images.shape
    x = images.reshape(*lead, height // patch, patch, width // patch, patch, channels)
    x = x.movedim(-4, -3)  # [..., H/p, W/p, p, p, C]
    return x.reshape(*lead, height // patch, width // patch, patch * patch * channels)


class ImageTokenizer(nn.Module):
    """Image tokens = Linear(patch RGB + per-pixel Plücker rays) [+ Linear(background patch)] [+ Linear(encoder)].

    The background image (the environment behind the object, LIRM) has its own linear layer, so lighting
    reaches the model apart from the object's colours. A frozen image encoder's patch features can be
    added through `encoder_channels`; none ships (no weights can be downloaded), so it is off by default.
    """

    def __init__(self, hidden: int, patch: int, background: bool, encoder_channels: int = 0) -> None:
        super().__init__()
        self.patch = patch
        self.pixels = nn.Linear(patch * patch * (3 + 1 + 6), hidden)  # RGB, mask, Plücker
        self.background = nn.Linear(patch * patch * 3, hidden, bias=False) if background else None
        self.encoder = nn.Linear(encoder_channels, hidden, bias=False) if encoder_channels else None

    def forward(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        rays: torch.Tensor,
        background: torch.Tensor | None = None,
        encoder_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images [B, V, H, W, 3] (display-encoded, see `network_colour`), masks [B, V, H, W], rays
        [B, V, H, W, 6] -> tokens [B, V, H/p, W/p, hidden]."""
        pixels = torch.cat([images, masks[..., None], rays], dim=-1)
        tokens = self.pixels(patchify(pixels, self.patch))
        if self.background is not None:
            if background is None:
                background = torch.zeros_like(images)  # unknown lighting: the layer sees black
            tokens = tokens + self.background(patchify(background, self.patch))
        if self.encoder is not None:
            if encoder_features is None:
                raise ValueError("this model was built with an image encoder; pass its patch features")
            tokens = tokens + self.encoder(encoder_features)
        return tokens


class VolumeEmbedding(nn.Module):
    """Factorised learned 3D positions (eq. 4): a token at (x, y, z) starts as e_x[x] + e_y[y] + e_z[z].

    Three tables of `resolution` rows instead of resolution^3, so a finer grid (stage 2) costs little;
    `at(voxels, resolution)` reads the tables at any resolution that divides or refines theirs, by
    linear interpolation along each axis.
    """

    def __init__(self, hidden: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.axes = nn.Parameter(torch.randn(3, resolution, hidden) * 0.02)

    def grid(self) -> torch.Tensor:
        """All tokens of the dense grid, x-major: [R^3, hidden]."""
        x, y, z = self.axes
        return (x[:, None, None] + y[None, :, None] + z[None, None, :]).reshape(-1, self.axes.shape[-1])

    def at(self, voxels: torch.Tensor, resolution: int) -> torch.Tensor:
        """Embeddings [M, hidden] of integer voxels [M, 3] of a cell-centred grid of `resolution` per axis,
        reading the tables by linear interpolation where the grid is finer than theirs."""
        tables = self.resampled(resolution)
        return tables[0][voxels[:, 0]] + tables[1][voxels[:, 1]] + tables[2][voxels[:, 2]]

    def resampled(self, resolution: int) -> torch.Tensor:
        """The three tables [3, resolution, hidden] at another resolution (cell centres interpolated)."""
        if resolution == self.resolution:
            return self.axes
        position = (torch.arange(resolution, device=self.axes.device) + 0.5) * self.resolution / resolution - 0.5
        position = position.clamp(0, self.resolution - 1)
        lower = position.floor().long().clamp(max=self.resolution - 2)
        fraction = (position - lower)[:, None]
        low, high = self.axes[:, lower], self.axes[:, lower + 1]
        return low + fraction * (high - low)

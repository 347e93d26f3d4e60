"""Procedural PBR materials for synthetic parts: colours, noise, stripes, checkers, glyphs and printed text.

A material is a function of a point in its part's local frame, so the pattern moves with the part.
Each material mixes a base and an accent layer (colour, roughness, metallic) by a pattern mask in
[0, 1], and a little fractal noise adds wear on top. Text is drawn once with Pillow's built-in font
into a small coverage texture and projected triplanarly. All colours are linear.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

PATTERNS = ("solid", "noise", "stripes", "checkers", "glyphs", "text")

# Lattice cells of the periodic noise volume: the noise repeats every NOISE_CELLS local units per octave.
NOISE_CELLS = 32


def noise_volume(seed: int, cells: int = NOISE_CELLS) -> Tensor:
    """Seeded random lattice values [cells + 1]^3 in [0, 1]; the last plane repeats the first, so it tiles."""
    values = torch.from_numpy(np.random.default_rng(seed).random((cells, cells, cells), dtype=np.float32))
    return F.pad(values[None, None], (0, 1, 0, 1, 0, 1), mode="circular")[0, 0]


def value_noise(points: Tensor, volume: Tensor) -> Tensor:
    """Trilinearly interpolated lattice noise in [0, 1] at points [N, 3], one lattice cell per unit."""
    cells = volume.shape[0] - 1
    wrapped = points / cells
    grid = (wrapped - wrapped.floor()) * 2.0 - 1.0  # align_corners=True: -1 and 1 hit the repeated planes
    sampled = F.grid_sample(volume[None, None].to(points), grid.view(1, 1, 1, -1, 3), align_corners=True)
    return sampled.view(-1)


def fbm(points: Tensor, volume: Tensor, octaves: int = 4) -> Tensor:
    """Fractal sum of value noise, in [0, 1]: each octave doubles the frequency and halves the amplitude."""
    total, amplitude, norm = torch.zeros_like(points[..., 0]), 1.0, 0.0
    for octave in range(octaves):
        # A shift per octave, so the octaves' lattices do not line up at the origin.
        total = total + amplitude * value_noise(points * 2.0**octave + 5.3 * octave, volume)
        norm += amplitude
        amplitude *= 0.5
    return total / norm


def text_texture(lines: list[str], font_size: int = 24, padding: int = 6) -> Tensor:
    """Coverage [H, W] in [0, 1] of `lines` printed with Pillow's built-in font (white on black)."""
    font = ImageFont.load_default(size=font_size)
    boxes = [font.getbbox(line) for line in lines]
    line_height = max(box[3] for box in boxes) + padding
    width = max(box[2] for box in boxes) + 2 * padding
    image = Image.new("L", (width, line_height * len(lines) + padding), 0)
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((padding, padding + row * line_height), line, fill=255, font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _sample_tiled(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of a texture [H, W] repeated over the plane, at uv [N, 2] (one tile per unit)."""
    grid = (uv - uv.floor()) * 2.0 - 1.0
    grid = torch.stack([grid[:, 0], -grid[:, 1]], dim=-1)  # image rows run down, v runs up
    sampled = F.grid_sample(texture[None, None], grid[None, None], mode="bilinear", align_corners=False)
    return sampled[0, 0, 0]


def triplanar(texture: Tensor, local: Tensor, extent: Tensor, tiles: Tensor) -> Tensor:
    """Project a tiled texture onto a part along its three local axes, blended by facing.

    The facing of a point is judged from its position relative to the part's extent, which matches
    the normal on boxes, spheres and cylinders well enough for print and needs no SDF gradient.
    tiles: [2] texture tiles per local unit along (u, v).
    """
    facing = (local / extent).abs() ** 8
    facing = facing / facing.sum(-1, keepdim=True).clamp_min(1e-12)
    result = torch.zeros_like(local[:, 0])
    for axis, (u, v) in enumerate(((1, 2), (0, 2), (0, 1))):
        uv = torch.stack([local[:, u], local[:, v]], dim=-1) * tiles
        result = result + facing[:, axis] * _sample_tiled(texture, uv)
    return result


@dataclass
class PartMaterial:
    """Two PBR layers (base, accent) mixed by a procedural pattern in the part's local frame."""

    pattern: str  # one of PATTERNS
    base_colour: Tensor  # [3] linear
    accent_colour: Tensor  # [3] linear
    roughness: tuple[float, float]  # base, accent
    metallic: tuple[float, float]  # base, accent
    frequency: float  # pattern cycles per local unit
    stripe_direction: Tensor  # [3] unit vector
    extent: Tensor  # [3] the part's half extents, for triplanar facing
    noise: Tensor  # [C + 1]^3 periodic lattice values (noise_volume)
    print_mask: Tensor | None = None  # [H, W] coverage for glyphs / text
    print_tiles: Tensor | None = None  # [2] texture tiles per local unit
    wear: float = 0.15  # strength of the fractal wear on colour and roughness

    def to(self, device: torch.device | str) -> PartMaterial:
        def move(value):
            return value.to(device) if isinstance(value, Tensor) else value

        return PartMaterial(**{name: move(value) for name, value in vars(self).items()})

    def pattern_mask(self, local: Tensor) -> Tensor:
        """Where the accent layer shows, [N] in [0, 1]."""
        if self.pattern == "solid":
            return torch.zeros_like(local[:, 0])
        if self.pattern == "noise":
            return ((fbm(local * self.frequency, self.noise) - 0.5) * 4.0 + 0.5).clamp(0.0, 1.0)
        if self.pattern == "stripes":
            phase = (local @ self.stripe_direction.to(local)) * self.frequency * 2.0 * torch.pi
            return (torch.sin(phase) * 4.0).clamp(-1.0, 1.0) * 0.5 + 0.5
        if self.pattern == "checkers":
            waves = torch.sin(local * self.frequency * torch.pi).prod(dim=-1)
            return (waves * 8.0).clamp(-1.0, 1.0) * 0.5 + 0.5
        if self.pattern in ("glyphs", "text"):
            texture = self.print_mask.to(local)
            return triplanar(texture, local, self.extent.to(local), self.print_tiles.to(local))
        raise ValueError(f"unknown pattern {self.pattern!r}")

    def __call__(self, local: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Albedo [N, 3], roughness [N] and metallic [N] at local points [N, 3]."""
        mask = self.pattern_mask(local)
        wear = fbm(local * 6.0 + 17.0, self.noise, octaves=3) - 0.5
        colour = torch.lerp(self.base_colour.to(local), self.accent_colour.to(local), mask[:, None])
        albedo = (colour * (1.0 + self.wear * wear[:, None])).clamp(0.0, 1.0)
        roughness = self.roughness[0] + (self.roughness[1] - self.roughness[0]) * mask
        roughness = (roughness + self.wear * wear).clamp(0.02, 1.0)
        metallic = self.metallic[0] + (self.metallic[1] - self.metallic[0]) * mask
        return albedo, roughness, metallic.clamp(0.0, 1.0)


def random_colour(rng: np.random.Generator, metal: bool) -> Tensor:
    """A linear colour: bright and mildly tinted for metals, anything from dark to light for paint."""
    hue = rng.random(3)
    if metal:
        colour = 0.55 + 0.4 * hue
    else:
        colour = (0.05 + 0.9 * hue) ** 2.2 * rng.uniform(0.4, 1.0)
    return torch.tensor(colour, dtype=torch.float32)


def _random_word(rng: np.random.Generator, length: int) -> str:
    letters = string.ascii_uppercase
    digits = string.digits
    word = "".join(rng.choice(list(letters), size=length))
    return f"{word}-{''.join(rng.choice(list(digits), size=3))}"


def random_material(rng: np.random.Generator, extent: Tensor) -> PartMaterial:
    """A seeded random material for a part of half extents `extent` [3] (local units)."""
    pattern = str(rng.choice(PATTERNS, p=[0.1, 0.15, 0.2, 0.15, 0.15, 0.25]))
    metal = rng.random() < 0.3
    base, accent = random_colour(rng, metal), random_colour(rng, rng.random() < 0.3)
    # Metals get an unmistakably different accent (paint or print on metal), paint a contrasting one.
    if not metal and float((base - accent).abs().max()) < 0.2:
        accent = 1.0 - base
    rough_base = float(rng.uniform(0.15, 0.45) if metal else rng.uniform(0.3, 0.9))
    metallic_base = 1.0 if metal else 0.0
    direction = torch.tensor(rng.normal(size=3), dtype=torch.float32)
    print_mask, print_tiles = None, None
    if pattern == "glyphs":
        symbols = list(string.ascii_letters + string.digits + "#%&@$?+=")
        lines = ["".join(rng.choice(symbols, size=8)) for _ in range(4)]
        print_mask = text_texture(lines, font_size=20)
        tiles_u = float(rng.uniform(1.5, 3.0))
        print_tiles = torch.tensor([tiles_u, tiles_u * print_mask.shape[1] / print_mask.shape[0]])
    elif pattern == "text":
        print_mask = text_texture([_random_word(rng, int(rng.integers(3, 7)))], font_size=28)
        # About one label across the part, keeping the glyphs' aspect ratio.
        tiles_u = float(rng.uniform(0.4, 0.8)) / float(extent.max())
        print_tiles = torch.tensor([tiles_u, tiles_u * print_mask.shape[1] / print_mask.shape[0]])
    return PartMaterial(
        pattern=pattern,
        base_colour=base,
        accent_colour=accent,
        roughness=(rough_base, float(rng.uniform(0.2, 0.9))),
        # Print and checkers on metal are paint (dielectric); noise and stripes on metal stay metal.
        metallic=(metallic_base, 1.0 if metal and pattern in ("noise", "stripes") else 0.0),
        frequency=float(rng.uniform(2.0, 6.0)) / float(extent.max()),
        stripe_direction=direction / direction.norm(),
        extent=extent.float(),
        noise=noise_volume(int(rng.integers(0, 2**32))),
        print_mask=print_mask,
        print_tiles=print_tiles,
    )

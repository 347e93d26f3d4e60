"""Every size, threshold and count of the LSRM transformer, by name (issue 4 §5, DESIGN §4).

The LSRM text lost its head counts and many resolutions; where a number is our choice rather than the
paper's, the field's comment says so. Three named configs: `tiny` (CPU tests), `small` (the shipped
checkpoint, at most 48 MB in bf16) and `paper` (24 blocks, hidden 1024, about 100K image and 300K
volume tokens at 16 views of 768^2).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..field import FieldConfig

ROUTINGS = ("3d", "score")


@dataclass(frozen=True)
class ModelConfig:
    # Transformer (stage 1 and stage 2 share these, so stage 2 can start from stage 1's weights).
    hidden: int = 256
    blocks: int = 6  # stage-1 blocks; stage 2 has as many
    heads: int = 16  # query heads
    kv_heads: int = 1  # GQA: 16 query heads per KV head (our choice: the kernel's tile needs a group of 16)
    head_dim: int = 16
    mlp_ratio: float = 4.0

    # Stage 1: images and the dense volume.
    image_size: int = 256  # input views are resized to this square size for stage 1
    patch_size: int = 8  # p: image tokens are p x p patches
    volume_tokens: int = 16  # volume tokens per axis (stage 1)
    upsample: int = 4  # eq. 9: each volume token becomes upsample^3 voxels of the feature volume
    channels: int = 32  # feature channels per voxel of the decoded volumes
    decoder_hidden: int = 64  # field MLP width
    decoder_layers: int = 2  # field MLP depth
    radiance: bool = False  # also decode an emitted colour (novel-view variant)
    background: bool = True  # inverse-rendering variant: encode a background image per view (LIRM)
    encoder_channels: int = 0  # features of a frozen image encoder per patch; 0 = no encoder (none ships)
    # Our addition, not the paper's: each stage-1 volume token also starts from the image tokens at its centre's
    # projection in every view (mean over the views that see it), so colour reaches the volume before attention
    # has learned where to look (docs/TRAINING.md, "Why colour did not learn, part 2"). False in old checkpoints.
    unproject: bool = False
    # Our addition too: the unprojected colours land in the volume's last channels, which the decoder's albedo reads
    # through a linear skip that starts as "albedo = the colour seen" (FieldConfig.colour_skip; docs/TRAINING.md,
    # part 3: without it the model stays colour-blind, greys of the right lightness). Needs unproject. False in old
    # checkpoints.
    colour_skip: bool = False

    # Stage 2: sparse tokens near the surface.
    sparse_image_size: int = 512  # views are resized to this for stage-2 image tokens
    sparse_volume_tokens: int = 32  # stage-2 volume token grid per axis (a refinement of volume_tokens)
    sdf_threshold: float = 1.0  # eq. 13: keep a voxel if some sub-point has |sdf| below this many voxel sizes
    sdf_subsamples: int = 3  # eq. 13: sub-points per axis inside each voxel
    image_block: int = 4  # 2D blocks of image_block x image_block patches
    volume_block: int = 4  # 3D blocks of volume_block^3 voxel tokens
    selected_image_blocks: int = 4  # n for queries that select image blocks (per query, all views)
    selected_volume_blocks: int = 4  # n for queries that select volume blocks
    image_candidates_per_view: int = 4  # 3D-aware routing: nearest image blocks per view before ranking in 3D
    routing: str = "3d"  # "3d" (LSRM §3.4) or "score" (the original NSA)
    window: bool = True  # the window branch in self-attention (the query's own block)
    max_image_tokens: int = 0  # safety cap on stage-2 image tokens; 0 = no cap
    max_volume_tokens: int = 0  # safety cap on stage-2 volume tokens; 0 = no cap

    def __post_init__(self) -> None:
        problems = []
        if self.heads % self.kv_heads:
            problems.append(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.image_size % self.patch_size or self.sparse_image_size % self.patch_size:
            problems.append("image sizes must be multiples of patch_size")
        if self.sparse_volume_tokens % self.volume_tokens:
            problems.append("sparse_volume_tokens must be a multiple of volume_tokens")
        if self.colour_skip and not self.unproject:
            problems.append("colour_skip reads the unprojected colours: it needs unproject")
        if self.routing not in ROUTINGS:
            problems.append(f"routing must be one of {ROUTINGS}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def field(self) -> FieldConfig:
        """The field the model's volumes are decoded as (LSRM eq. 9-12)."""
        return FieldConfig(
            channels=self.channels,
            dense_resolution=self.volume_tokens * self.upsample,
            sparse_resolution=self.sparse_volume_tokens * self.upsample,
            hidden=self.decoder_hidden,
            hidden_layers=self.decoder_layers,
            radiance=self.radiance,
            colour_skip=self.colour_skip,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """The config stored in a checkpoint; unknown or missing keys are reported by name."""
        values: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown} (a checkpoint from a newer version?)")
        return cls(**values)


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        hidden=64,
        blocks=2,
        heads=4,
        kv_heads=1,
        head_dim=16,
        image_size=64,
        patch_size=8,
        volume_tokens=8,
        upsample=2,
        channels=8,
        decoder_hidden=32,
        sparse_image_size=96,
        sparse_volume_tokens=16,
        image_block=2,
        volume_block=2,
        selected_image_blocks=3,
        selected_volume_blocks=3,
        image_candidates_per_view=3,
        unproject=True,
        colour_skip=True,
    ),
    # about 45 MB of bf16 weights (tests/test_model.py checks the 48 MB limit)
    "small": ModelConfig(unproject=True, colour_skip=True),
    "paper": ModelConfig(
        hidden=1024,
        blocks=24,
        heads=16,
        kv_heads=1,
        head_dim=64,
        image_size=512,
        patch_size=8,
        volume_tokens=32,
        upsample=4,
        channels=32,
        decoder_hidden=64,
        sparse_image_size=768,
        sparse_volume_tokens=128,
        image_block=8,
        volume_block=4,
        selected_image_blocks=16,
        selected_volume_blocks=16,
        image_candidates_per_view=4,
        unproject=True,
        colour_skip=True,
    ),
}

"""The LSRM transformer (LSRM §3, DESIGN §4 Engine A): posed views in, a dense + sparse feature field out.

    views --tokenise (eq. 3, 4)--> image + volume tokens --DenseBlocks (eq. 5-8)--> unpatchify (eq. 9)
          --> dense feature volume = stage-1 field
    stage-1 field --informative tokens (eq. 13), spatial blocks, 3D-aware routing (§3.4)--> SparseBlocks
          (NSA, eq. 14-15) --> unpatchify --> residual over the upsampled dense features = sparse field

Both stages decode through the same `FieldDecoder` heads (SDF + offset, albedo, roughness, metallic
and optionally radiance), so their output is a `GridField` the renderer, the exporter and Engine B use
like any other field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cameras import Cameras, image_rays, plucker, project
from ..colour import linear_to_srgb
from ..field import COLOUR_CHANNELS, FieldDecoder, GridField, SurfaceField, read_dense, voxel_centres
from ..parallel import SequenceShard, broadcast_rows
from ..progress import Progress, no_progress
from .attention import DenseBlock
from .config import ModelConfig
from .sparse import (
    SparseBlock,
    build_layout,
    foreground_patches,
    informative_voxels,
    patch_points,
    prepare_kernel_lists,
    route,
)
from .timing import section
from .tokens import ImageTokenizer, VolumeEmbedding


@dataclass
class Views:
    """A batch of posed views in the canonical frame. Colours are linear; cameras are OpenCV."""

    images: torch.Tensor  # [B, V, H, W, 3]
    masks: torch.Tensor  # [B, V, H, W] in [0, 1]
    cameras: list[Cameras]  # B entries of V cameras each, for images of H x W
    background: torch.Tensor | None = None  # [B, V, H, W, 3] the lighting behind the object, if known

    def resized(self, size: int) -> Views:
        """The views resampled to size x size (cameras rescaled to match: rays stay exact)."""
        batch, views, height, width, _ = self.images.shape
        if (height, width) == (size, size):
            return self

        def resample(x: torch.Tensor) -> torch.Tensor:  # [B, V, H, W, C] -> [B, V, size, size, C]
            flat = x.reshape(batch * views, height, width, -1).permute(0, 3, 1, 2)
            out = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return out.permute(0, 2, 3, 1).reshape(batch, views, size, size, -1)

        return Views(
            images=resample(self.images),
            masks=resample(self.masks[..., None])[..., 0],
            cameras=[c.resized(size, size) for c in self.cameras],
            background=resample(self.background) if self.background is not None else None,
        )


@dataclass
class Prediction:
    fields: list[GridField]  # per object: the final field (stage 2 when it ran, else stage 1)
    dense_fields: list[GridField]  # per object: the stage-1 field
    counts: dict[str, int]  # token counts (for logs and benchmarks)


def network_colour(linear: torch.Tensor) -> torch.Tensor:
    """What the network sees of a linear colour: display-encoded (sRGB) in [0, 1], like the photos it mimics."""
    return linear_to_srgb(linear.clamp(0.0, 1.0))


def unpatchify(tokens: torch.Tensor, resolution: int, upsample: int, channels: int) -> torch.Tensor:
    """[B, R^3, u^3 * C] tokens (x-major) -> [B, C, R*u, R*u, R*u] feature volume (eq. 9)."""
    batch = tokens.shape[0]
    r, u = resolution, upsample
    x = tokens.reshape(batch, r, r, r, u, u, u, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, x, ux, y, uy, z, uz]
    return x.reshape(batch, channels, r * u, r * u, r * u)


def unprojected(tokens: torch.Tensor, cameras: list[Cameras], points: torch.Tensor) -> torch.Tensor:
    """The image tokens [B, V, h, w, C] read at the projections of points [N, 3] and averaged over the views
    that see each point in front of them: [B, N, C]. The cameras are those of the images the tokens cover."""
    out = []
    # float32 throughout: projections and sample positions in bf16 would be off by pixels
    with torch.autocast(tokens.device.type, enabled=False):
        for b in range(tokens.shape[0]):
            pixels, depth = project(cameras[b], points.float())  # [V, N, 2] on the image plane, [V, N]
            size = torch.tensor([cameras[b].width, cameras[b].height], device=pixels.device, dtype=pixels.dtype)
            grid = pixels / size * 2.0 - 1.0  # the token map spans the image: grid_sample's [-1, 1] is its border
            seen = ((depth > 0) & (grid.abs() <= 1.0).all(-1)).float()  # [V, N]
            maps = tokens[b].permute(0, 3, 1, 2).float()  # [V, C, h, w]
            read = F.grid_sample(maps, grid[:, :, None, :], align_corners=False)[..., 0]  # [V, C, N]
            total = (read * seen[:, None, :]).sum(0)  # [C, N]
            out.append((total / seen.sum(0).clamp_min(1.0)).T)
    return torch.stack(out)


class Stage(nn.Module):
    """One stage's tokenisers, blocks and output layer; stage 2 has the same names so it loads stage 1's."""

    def __init__(
        self, config: ModelConfig, block: type[nn.Module], volume_resolution: int, unproject: bool = False
    ) -> None:
        super().__init__()
        self.image_tokens = ImageTokenizer(config.hidden, config.patch_size, config.background, config.encoder_channels)
        self.volume_tokens = VolumeEmbedding(config.hidden, volume_resolution)
        # ModelConfig.unproject: volume tokens add a projection of the image tokens seen at their centres, and the
        # dense volume's voxels one of the input colours seen at theirs.
        self.unproject = nn.Linear(config.hidden, config.hidden) if unproject else None
        self.unproject_colour = nn.Linear(3, config.channels) if unproject else None
        self.blocks = nn.ModuleList(block(config) for _ in range(config.blocks))
        if block is SparseBlock:
            self.blocks[-1] = SparseBlock(config, last=True)
        self.norm = nn.LayerNorm(config.hidden)
        self.unpatchify = nn.Linear(config.hidden, config.upsample**3 * config.channels)

    def image_input(self, views: Views) -> torch.Tensor:
        """Image tokens [B, V, h, w, hidden] of views already at this stage's size."""
        rays = torch.stack([plucker(*image_rays(c)) for c in views.cameras]).to(views.images)
        background = network_colour(views.background) if views.background is not None else None
        return self.image_tokens(network_colour(views.images), views.masks, rays, background)


class LSRM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.dense = Stage(config, DenseBlock, config.volume_tokens, unproject=config.unproject)
        self.sparse = Stage(config, SparseBlock, config.sparse_volume_tokens)
        self.decoder = FieldDecoder(config.field)
        field = config.field
        self.log_beta = nn.Parameter(torch.tensor(math.log(field.beta_init - field.beta_min)))
        self.dense.apply(_init_weights)
        if config.colour_skip:
            self._start_colour_channels()
        self.start_sparse_from_dense()
        self.gradient_checkpointing = False  # training: recompute each block's activations in the backward pass

    def _run(self, block: nn.Module, *inputs):
        """One transformer block, under activation checkpointing when it is on and gradients are wanted."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    @torch.no_grad()
    def _start_colour_channels(self) -> None:
        """The dense volume's colour channels (FieldConfig.colour_skip) start as exactly the sRGB colour its views see
        there: the unprojection copies it in, and the transformer adds nothing until it learns to."""
        channels = self.config.channels
        colour = slice(channels - COLOUR_CHANNELS, channels)
        self.dense.unproject_colour.weight[colour] = torch.eye(COLOUR_CHANNELS)
        self.dense.unproject_colour.bias[colour] = 0.0
        rows = self.dense.unpatchify.weight.view(-1, channels, self.config.hidden)  # [u^3, C, hidden]
        rows[:, colour] = 0.0
        self.dense.unpatchify.bias.view(-1, channels)[:, colour] = 0.0

    @torch.no_grad()
    def with_colour_skip(self) -> LSRM:
        """This model's weights in a model with the colour skip, so a run trained without it can continue with it
        (`train --init`): the colour channels and the decoder's skip start as in a fresh model; the decoder's other
        weights read colour where they read learned features before, and training adapts them."""
        if self.config.colour_skip:
            return self
        model = LSRM(replace(self.config, colour_skip=True))
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        if unexpected or set(missing) != {"decoder.colour.weight", "decoder.colour.bias"}:
            raise ValueError(f"not the same model apart from the colour skip: {missing=}, {unexpected=}")
        model._start_colour_channels()
        return model

    @torch.no_grad()
    def start_sparse_from_dense(self) -> None:
        """Stage 2 starts as a copy of stage 1 (LSRM §3.3) whose residual is zero, so the sparse field
        begins exactly at the dense one. The finer volume positions interpolate stage 1's tables."""
        target = self.sparse.state_dict()
        copied = {k: v for k, v in self.dense.state_dict().items() if k in target and v.shape == target[k].shape}
        self.sparse.load_state_dict(copied, strict=False)
        self.sparse.volume_tokens.axes.copy_(self.dense.volume_tokens.resampled(self.config.sparse_volume_tokens))
        nn.init.zeros_(self.sparse.unpatchify.weight)
        nn.init.zeros_(self.sparse.unpatchify.bias)

    def field(
        self, dense: torch.Tensor, voxels: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> GridField:
        """A field decoded by this model's heads from a dense volume [C, R, R, R] and optional sparse voxels."""
        return GridField(self.config.field, self.decoder, dense, self.log_beta, voxels, features)

    def forward(
        self,
        views: Views,
        stages: int = 2,
        progress: Progress = no_progress,
        guide: list[SurfaceField] | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> Prediction:
        """Reconstruct each object of the batch. stages=1 runs the dense transformer only.

        guide: per object, the geometry that picks stage 2's tokens and places image tokens in 3D; by
        default the stage-1 field (LSRM §3.3). Known geometry can stand in, e.g. to train or benchmark
        stage 2 while stage 1 is untrained.
        group: a sequence-parallel group whose ranks all hold this batch (`backend.parallel`): each computes
        stage 2's blocks for its own whole spatial blocks and the output is whole on every rank. The gradient of
        one loss, summed over the group, is then `group size` times the single-process one (DDP's mean over
        all ranks gives the mean over the groups' batches).
        """
        config = self.config
        with section("tokenise"):
            low = views.resized(config.image_size)
            batch, count = low.images.shape[:2]
            image = self.dense.image_input(low)  # [B, V, h, w, C]
            patch_grid = image.shape[2:4]
            i = image.flatten(1, 3)
            v = self.dense.volume_tokens.grid().expand(batch, -1, -1)
            if self.dense.unproject is not None:
                v = v + self.dense.unproject(unprojected(image, low.cameras, _grid_centres(config.volume_tokens, v)))
        with section("stage 1"):
            for index, block in enumerate(self.dense.blocks):
                v, i = self._run(block, v, i)
                progress("stage 1", (index + 1) / len(self.dense.blocks))
        with section("dense volume"):
            dense = unpatchify(
                self.dense.unpatchify(self.dense.norm(v)), config.volume_tokens, config.upsample, config.channels
            )
            if self.dense.unproject_colour is not None:
                resolution = dense.shape[-1]
                colours = unprojected(network_colour(low.images), low.cameras, _grid_centres(resolution, dense))
                seen = self.dense.unproject_colour(colours)  # [B, R^3, C], x-major like the volume
                dense = dense + seen.transpose(1, 2).reshape(dense.shape)
            dense_fields = [self.field(dense[b]) for b in range(batch)]
        counts = {"stage-1 volume tokens": v.shape[1], "stage-1 image tokens": i.shape[1]}
        if stages == 1:
            return Prediction(dense_fields, dense_fields, counts)

        high = views.resized(config.sparse_image_size)
        p, r2 = config.patch_size, config.sparse_volume_tokens
        guide = dense_fields if guide is None else guide
        device = dense.device
        with torch.no_grad(), section("informative tokens"):
            voxels = [
                self._cap(informative_voxels(g, r2, config.sdf_threshold, config.sdf_subsamples, device), g, r2)
                for g in guide
            ]
            patches = [foreground_patches(high.masks[b], p).nonzero() for b in range(batch)]
            points = [patch_points(guide[b], high.cameras[b], patches[b], p) for b in range(batch)]
            if group is not None:  # the whole group builds the first rank's layout
                agreed = broadcast_rows([*voxels, *patches, *points], group, device)
                voxels, patches, points = agreed[:batch], agreed[batch : 2 * batch], agreed[2 * batch :]
        if sum(map(len, voxels)) == 0 or sum(map(len, patches)) == 0:
            # No surface near any voxel (an untrained stage 1) or no foreground: the dense field is the answer.
            counts.update({"volume tokens": 0, "image tokens": 0})
            return Prediction(dense_fields, dense_fields, counts)
        with section("layout + routing"):
            layout = build_layout(voxels, patches, points, config)
            if config.routing == "3d":
                route(layout, high.cameras, config)
        with section("kernel lists"):
            prepare_kernel_lists(layout, config)
        counts.update(layout.counts)

        # Stage-2 tokens: the stage-1 output tokens, upsampled to the finer grids, plus the new positions / patches.
        with section("stage-2 tokens"):
            image_object = layout.image.block_object[layout.image.token_block]
            i_low = i.reshape(batch, count, *patch_grid, -1).permute(0, 1, 4, 2, 3).flatten(0, 1)
            high_grid = (config.sparse_image_size // p, config.sparse_image_size // p)
            i_up = F.interpolate(i_low, size=high_grid, mode="bilinear", align_corners=False)
            i_up = i_up.reshape(batch, count, -1, *i_up.shape[-2:]).permute(0, 1, 3, 4, 2)  # [B, V, h2, w2, C]
            i_high = self.sparse.image_input(high) + i_up
            view, row, col = layout.image_patches.unbind(-1)
            i2 = i_high[image_object, view, row, col]

            volume_object = layout.volume.block_object[layout.volume.token_block]
            r1 = config.volume_tokens
            v_grid = v.transpose(1, 2).reshape(batch, -1, r1, r1, r1)
            v_up = F.interpolate(v_grid, size=(r2, r2, r2), mode="trilinear", align_corners=False)
            x, y, z = layout.volume_voxels.unbind(-1)
            v2 = v_up[volume_object, :, x, y, z] + self.sparse.volume_tokens.at(layout.volume_voxels, r2)

        shard = SequenceShard.of(layout, group) if group is not None else None
        if shard is not None:  # every rank built all the tokens, so its whole blocks are a slice of them
            v2, i2 = v2[shard.volume.rows], i2[shard.image.rows]
            counts["tokens on this rank"] = len(v2) + len(i2)
        for index, block in enumerate(self.sparse.blocks):
            with section(f"stage 2 block {index}"):
                v2, i2 = self._run(block, v2, i2, layout, shard)
            progress("stage 2", (index + 1) / len(self.sparse.blocks))
        if shard is not None:
            v2 = shard.volume.gather_tokens(v2)

        with section("sparse field"):
            residual = self.sparse.unpatchify(self.sparse.norm(v2))  # [Mv, u^3 * C]
            fine_voxels, residual = _fine_voxels(layout.volume_voxels, residual, config.upsample, config.channels)
            fine_object = volume_object.repeat_interleave(config.upsample**3)
            fine_resolution = config.field.sparse_resolution
            fields = []
            for b in range(batch):
                mine = fine_object == b
                centres = voxel_centres(fine_voxels[mine], fine_resolution).to(dense)
                features = read_dense(dense[b], centres) + residual[mine]
                fields.append(self.field(dense[b], fine_voxels[mine], features))
        return Prediction(fields, dense_fields, counts)

    def _cap(self, voxels: torch.Tensor, field: SurfaceField, resolution: int) -> torch.Tensor:
        """At most max_volume_tokens voxels: those nearest the surface (a memory guard, off by default)."""
        limit = self.config.max_volume_tokens
        if not limit or len(voxels) <= limit:
            return voxels
        distance = field.sdf(voxel_centres(voxels, resolution).to(self.log_beta.device)).abs()
        return voxels[distance.argsort()[:limit].cpu()]


def _fine_voxels(
    voxels: torch.Tensor, residual: torch.Tensor, upsample: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token voxels [M, 3] with unpatchified rows [M, u^3 * C] -> fine voxels [M * u^3, 3] and features."""
    steps = torch.arange(upsample, device=voxels.device)
    offsets = torch.cartesian_prod(steps, steps, steps)  # x-major, as unpatchify lays them out
    fine = (voxels[:, None, :] * upsample + offsets).reshape(-1, 3)
    return fine, residual.reshape(-1, channels)


def _grid_centres(resolution: int, like: torch.Tensor) -> torch.Tensor:
    """Centres [R^3, 3] of a cell-centred grid over the canonical box, x-major (as tokens and volumes are laid out)."""
    axis = torch.arange(resolution, device=like.device)
    return voxel_centres(torch.cartesian_prod(axis, axis, axis), resolution).to(like.device)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""Stage 2's sparse tokens (LSRM §3.3-3.4): which tokens exist, how they are grouped, who attends to whom.

Informative tokens are the foreground image patches and the voxels near the stage-1 surface (eq. 13).
They are grouped into spatial blocks (2D for images, 3D for the volume) and packed over the batch so
every block is contiguous. NSA attention then reads whole blocks: compressed, selected (routed) and,
for a set attending to itself, the query's own block (window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.nsa import Selection, prepare

from ..cameras import Cameras, pixel_rays
from ..field import SurfaceField, near_surface_voxels, voxel_centres
from ..render import RenderOptions, peak_points
from .attention import PAIRS, TokenBlock
from .blocks import TokenBlocks, image_block_centres_px, partition
from .config import ModelConfig
from .nsa import NSACrossAttention
from .routing import per_kv_head, route_to_image, route_to_volume

if TYPE_CHECKING:
    from ..parallel import SequenceShard

FOREGROUND = 0.5  # a patch is foreground if any of its mask pixels reaches this
_POINTS_PER_CALL = 262144  # field points per SDF call when picking voxels: bounds the decoder's memory


@torch.no_grad()
def informative_voxels(
    field: SurfaceField, resolution: int, threshold: float, subsamples: int, device: torch.device
) -> torch.Tensor:
    """Integer voxels [M, 3] of a resolution^3 grid near the field's surface (LSRM eq. 13).

    A voxel is kept when the SDF at one of its subsamples^3 uniform sub-points is below `threshold`
    voxel sizes in magnitude. Candidates come first from voxel centres with a band widened by the
    half-diagonal (cheap, coarse to fine). With an odd subsamples the centre is itself a sub-point,
    so a candidate whose centre is inside the band is kept at once; the other sub-points are only
    evaluated for the rest (about half the candidates on a smooth surface).
    """
    voxel = 2.0 / resolution
    band = threshold * voxel
    candidates = near_surface_voxels(field.sdf, resolution, band + 0.5 * math.sqrt(3.0) * voxel, device)
    if len(candidates) == 0:
        return candidates
    steps = (torch.arange(subsamples, device=device) + 0.5) / subsamples - 0.5  # in voxel units
    offsets = torch.cartesian_prod(steps, steps, steps) * voxel  # [S, 3]
    keep = torch.zeros(len(candidates), dtype=torch.bool, device=device)
    if subsamples % 2:
        centres = voxel_centres(candidates, resolution).to(device)
        keep = torch.cat([field.sdf(part).abs() < band for part in centres.split(_POINTS_PER_CALL)])
        offsets = offsets[offsets.abs().sum(-1) > 0]  # the centre is decided
    undecided = (~keep).nonzero()[:, 0] if len(offsets) else keep.new_zeros(0, dtype=torch.long)
    for part in undecided.split(max(1, _POINTS_PER_CALL // max(len(offsets), 1))):
        centres = voxel_centres(candidates[part.cpu()], resolution).to(device)
        points = (centres[:, None] + offsets).reshape(-1, 3)
        keep[part] = field.sdf(points).abs().reshape(len(part), len(offsets)).amin(1) < band
    return candidates[keep.cpu()]


def foreground_patches(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """[V, H, W] masks -> [V, H/p, W/p] True where the patch holds a foreground pixel."""
    views, height, width = masks.shape
    pooled = masks.reshape(views, height // patch, patch, width // patch, patch).amax(dim=(2, 4))
    return pooled >= FOREGROUND


@torch.no_grad()
def patch_points(field: SurfaceField, cameras: Cameras, patches: torch.Tensor, patch: int) -> torch.Tensor:
    """3D points [M, 3] of image tokens: the opacity peak along the ray through each patch centre (§3.4).

    patches [M, 3] integer (view, row, col) of images the size of `cameras`.
    """
    centres = (patches[:, 1:].flip(-1).float() + 0.5) * patch  # (x, y) pixels
    origins, directions = pixel_rays(cameras[patches[:, 0].to(cameras.device)], centres[:, None, :])
    # 16K rays a chunk: few large launches instead of many small ones (some 100 MB of decoder work each).
    options = RenderOptions(samples=32, importance_samples=32, chunk_rays=16384)
    points, _ = peak_points(field, origins[:, 0], directions[:, 0], options)
    return points


@dataclass
class SparseLayout:
    """The packed stage-2 tokens of a batch and everything attention needs about them."""

    volume: TokenBlocks  # voxel tokens, blocks of volume_block^3
    image: TokenBlocks  # patch tokens, 2D blocks of image_block^2 per view
    volume_voxels: torch.Tensor  # [Mv, 3] integer voxels (sorted order) of the stage-2 token grid
    volume_points: torch.Tensor  # [Mv, 3] their centres, canonical frame
    image_patches: torch.Tensor  # [Mi, 3] (view, row, col) (sorted order)
    image_points: torch.Tensor  # [Mi, 3] 3D points of image tokens (opacity peaks of the stage-1 field)
    selected: dict[str, Selection | None]  # per pair "vv", "vi", "ii", "iv": lists [Mq, kv_heads, n]; None: score
    windows: dict[str, Selection]  # per set "v", "i": each token's own block, the window branch's one-entry lists

    @property
    def counts(self) -> dict[str, int]:
        return {"volume tokens": len(self.volume_voxels), "image tokens": len(self.image_patches)}


@torch.no_grad()
def route(layout: SparseLayout, cameras: list[Cameras], config: ModelConfig) -> None:
    """3D-aware routing (LSRM §3.4), once per forward, shared by every block: fills `layout.selected`."""
    volume_centres = layout.volume.centres(layout.volume_points)
    image_centre_px = image_block_centres_px(layout.image, config.image_block, config.patch_size)
    queries = {"v": (layout.volume_points, layout.volume.token_cu), "i": (layout.image_points, layout.image.token_cu)}
    for pair in PAIRS:
        points, cu = queries[pair[0]]
        if pair[1] == "v":
            n = config.selected_volume_blocks
            chosen = route_to_volume(points, volume_centres, cu, layout.volume.block_cu, n)
        else:
            n = config.selected_image_blocks
            chosen = route_to_image(
                points,
                layout.image_points,
                layout.image,
                image_centre_px,
                cameras,
                cu,
                config.image_candidates_per_view,
                n,
            )
        layout.selected[pair] = Selection(per_kv_head(chosen, config.kv_heads))


@torch.no_grad()
def prepare_kernel_lists(layout: SparseLayout, config: ModelConfig) -> None:
    """Build the kernels' walks of every fixed selection now (a no-op off CUDA), once for all blocks."""
    keys = {"v": layout.volume, "i": layout.image}
    for pair, selection in layout.selected.items():
        if selection is not None:
            prepare(selection, keys[pair[1]].block_offsets, config.heads, config.head_dim)
    if config.window:
        for name, selection in layout.windows.items():
            prepare(selection, keys[name].block_offsets, config.heads, config.head_dim)


class SparseBlock(TokenBlock):
    """Stage 2: the dense block with NSA cross-attention in place of dense attention (eq. 14-15)."""

    def __init__(self, config: ModelConfig, last: bool = False) -> None:
        args = (config.hidden, config.heads, config.kv_heads, config.head_dim)
        pairs = ("vv", "vi") if last else PAIRS  # nothing reads the image tokens after the last block
        self_branches = ("compressed", "selected", "window") if config.window else ("compressed", "selected")
        cross_branches = ("compressed", "selected")
        attention = {
            pair: NSACrossAttention(*args, branches=self_branches if pair[0] == pair[1] else cross_branches)
            for pair in pairs
        }
        super().__init__(config, attention)
        self.top_n = {
            pair: config.selected_volume_blocks if pair[1] == "v" else config.selected_image_blocks for pair in PAIRS
        }
        self.window = config.window

    def forward(
        self, v: torch.Tensor, i: torch.Tensor, layout: SparseLayout, shard: SequenceShard | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v [Mv, C], i [Mi, C]: packed tokens in block order; with `shard` (sequence parallelism,
        `backend.parallel`), only this rank's rows of them."""
        nv, ni = self.norm_v(v), self.norm_i(i)
        sets = {"v": (nv, layout.volume), "i": (ni, layout.image)}
        updates = {}
        for pair in self.pairs:
            (x_q, query_blocks), (x_kv, key_blocks) = sets[pair[0]], sets[pair[1]]
            own_block = layout.windows[pair[0]] if pair[0] == pair[1] and self.window else None
            query_cu, selected, key_shard = query_blocks.token_cu, layout.selected[pair], None
            if shard is not None:  # this rank's queries; the layout's block indices stay global
                rows, key_shard = shard[pair[0]].rows, shard[pair[1]]
                query_cu = shard[pair[0]].query_cu
                selected = selected.blocks[rows] if selected is not None else None
                own_block = key_blocks.token_block[rows] if own_block is not None else None
            updates[pair] = self.attention[pair](
                x_q,
                x_kv,
                keys=key_blocks,
                query_cu=query_cu,
                selected=selected,
                top_n=self.top_n[pair],
                query_block=own_block,
                shard=key_shard,
            )
        dv, di = self.gated(updates)
        return self.feed_forward(v + dv, i + di if di is not None else i)


def build_layout(
    volume_voxels: list[torch.Tensor],
    image_patches: list[torch.Tensor],
    image_points: list[torch.Tensor],
    config: ModelConfig,
) -> SparseLayout:
    """Pack the informative tokens of each object (lists over the batch) into spatial blocks."""
    device = image_points[0].device if image_points else torch.device("cpu")

    def objects(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(parts)]).to(device)

    voxels = torch.cat(volume_voxels).to(device)
    patches = torch.cat(image_patches).to(device)
    b = config.volume_block
    count = len(volume_voxels)
    volume = partition(voxels, (b, b, b), objects(volume_voxels), num_objects=count)
    image = partition(patches, (1, config.image_block, config.image_block), objects(image_patches), num_objects=count)
    voxels, patches = volume.sort(voxels), image.sort(patches)
    return SparseLayout(
        volume=volume,
        image=image,
        volume_voxels=voxels,
        volume_points=voxel_centres(voxels, config.sparse_volume_tokens),
        image_patches=patches,
        image_points=image.sort(torch.cat(image_points)),
        selected={pair: None for pair in PAIRS},
        windows={
            "v": Selection.window(volume.token_block, config.kv_heads),
            "i": Selection.window(image.token_block, config.kv_heads),
        },
    )

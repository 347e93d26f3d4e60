"""The field: what every engine produces and everything downstream consumes.

A field answers, for points in the canonical box [-1, 1]^3, a signed distance (negative inside)
and PBR materials. The renderer, marching cubes and the texture baker accept any object with
this interface: the learned `FeatureField` below and the analytic synthetic objects alike.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FieldSample:
    """Field values at N points. Colours are linear; all values are per point."""

    sdf: torch.Tensor  # [N] signed distance in canonical units, negative inside
    albedo: torch.Tensor  # [N, 3] linear base colour in [0, 1]
    roughness: torch.Tensor  # [N] perceptual roughness in [0, 1] (glTF / Blender meaning)
    metallic: torch.Tensor  # [N] in [0, 1]
    radiance: torch.Tensor | None = None  # [N, 3] optional emitted colour (novel-view mode)
    offset: torch.Tensor | None = None  # [N] LIRM's effective offset: added to sdf for density only (see FieldDecoder)


class SurfaceField(Protocol):
    """Anything that can be rendered, meshed and baked."""

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance [N] at points [N, 3]; cheaper than a full query."""
        ...

    def __call__(self, points: torch.Tensor) -> FieldSample:
        """All field values at points [N, 3]."""
        ...

    @property
    def beta(self) -> torch.Tensor:
        """VolSDF's Laplace scale (canonical units): smaller is a sharper surface."""
        ...


# ---------------------------------------------------------------------------------------------
# The learned field: dense + sparse feature grids decoded by small MLP heads (LSRM eq. 9-12).


@dataclass
class FieldConfig:
    """Every size of a FeatureField. Grids are cell-centred: voxel k of R along an axis has its centre
    at -1 + (2k + 1) / R, as a transformer's voxel tokens would."""

    channels: int = 32  # feature channels per voxel
    dense_resolution: int = 64  # voxels per axis of the dense grid over the whole box
    sparse_resolution: int = 256  # voxels per axis of the fine grid (only near-surface voxels are stored)
    hidden: int = 64  # MLP width
    hidden_layers: int = 2  # MLP depth before the heads
    radiance: bool = False  # also decode an emitted colour (novel-view mode)
    beta_init: float = 0.02  # VolSDF Laplace scale at start, canonical units
    beta_min: float = 1e-4  # beta never goes below this (keeps density finite)
    max_offset: float = 0.05  # bound of the effective SDF offset, canonical units
    init_std: float = 0.1  # std of the random initial features
    # 0: every head reads all channels through one trunk. k > 0: the SDF (and offset) read only the first k
    # channels through their own trunk and the materials the rest, so fitting colour detail cannot bend the
    # surface (refinement's bumps came from texture explained as geometry).
    geometry_channels: int = 0
    # True: the albedo's logits also add a linear map of the last COLOUR_CHANNELS feature channels, which start as
    # "albedo = the sRGB colour held there" (the model writes the colour its views see into them). The MLP passes
    # ~1/250 of a feature change at init and learns only brightness for ~1000 steps; this path passes hue at full
    # gain from the first step (docs/TRAINING.md, "Why colour did not learn, part 3"). False in old checkpoints.
    colour_skip: bool = False


COLOUR_CHANNELS = 3  # the last feature channels, read by the colour skip
# sigmoid(gain * s + offset) is within 0.03 of sRGB value s, in sRGB, for s in [0, 1] (a least-squares fit).
COLOUR_SKIP_GAIN, COLOUR_SKIP_OFFSET = 6.7, -4.75


def grid_indices_and_weights(points: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 voxels around each point of a cell-centred grid and their trilinear weights.

    points [N, 3] in [-1, 1]^3 (outside is clamped to the border). Returns integer voxel coordinates
    [N, 8, 3] (x, y, z) and weights [N, 8] that sum to 1; the weights are differentiable in the points
    (twice, so eikonal losses can train through them).
    """
    position = ((points + 1.0) * 0.5 * resolution - 0.5).clamp(0.0, resolution - 1.0)
    lower = position.detach().floor().clamp(max=resolution - 2).long()
    fraction = position - lower
    corners = _corners(points.device)
    indices = lower[:, None, :] + corners  # [N, 8, 3]
    per_axis = torch.where(corners.bool(), fraction[:, None, :], 1.0 - fraction[:, None, :])
    # Products written out: `prod`'s backward (zero-safe) runs cumulative scans that took most of a
    # refinement step on an H200 (bench/profile_refine.py); plain multiplications have a trivial one.
    return indices, per_axis[..., 0] * per_axis[..., 1] * per_axis[..., 2]


@functools.cache
def _corners(device: torch.device) -> torch.Tensor:
    """The 8 corner offsets [8, 3] of a voxel, made once per device (a host-to-device copy stalls the GPU)."""
    return torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.long).to(device)


def _linear_index(indices: torch.Tensor, resolution: int) -> torch.Tensor:
    return (indices[..., 0] * resolution + indices[..., 1]) * resolution + indices[..., 2]


def read_dense(dense: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear read of a cell-centred feature grid [C, R, R, R] (x, y, z) at points [N, 3] -> [N, C]."""
    channels, resolution = dense.shape[0], dense.shape[1]
    indices, weights = grid_indices_and_weights(points, resolution)
    flat = dense.reshape(channels, -1)
    # index_select, not advanced indexing: its backward is an index_add, several times faster on CUDA than
    # the sorted index_put that indexing's backward runs (the profile of refinement's fine stage, issue 3).
    corners = flat.index_select(1, _linear_index(indices, resolution).reshape(-1)).reshape(channels, len(points), 8)
    return (corners * weights).sum(-1).T


def _sparse_neighbours(
    keys: torch.Tensor, resolution: int, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 8 fine voxels around each point: whether each is active [N, 8], its row in the sparse
    features [N, 8] (meaningless where inactive) and its trilinear weight [N, 8]."""
    indices, weights = grid_indices_and_weights(points, resolution)
    wanted = _linear_index(indices, resolution)
    rows = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
    found = (keys[rows] == wanted).to(weights.dtype)
    return found, rows, weights


def read_blended(
    dense: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, resolution: int, points: torch.Tensor
) -> torch.Tensor:
    """Features at points [N, 3] from a dense grid [C, R, R, R] and a sparse fine grid (sorted linear voxel
    keys [M] of a resolution^3 grid, features [M, C]): each of a point's 8 fine voxels contributes its own
    feature where it is active and the dense feature at the point where not (LSRM §3.3's blend)."""
    dense_part = read_dense(dense, points)
    if len(keys) == 0:
        return dense_part
    found, rows, weights = _sparse_neighbours(keys, resolution, points)
    sparse_weights = weights * found  # [N, 8]
    corners = features.index_select(0, rows.reshape(-1)).reshape(*rows.shape, features.shape[-1])  # [N, 8, C]
    sparse_part = (corners * sparse_weights[..., None]).sum(1)
    return sparse_part + (1.0 - sparse_weights.sum(1, keepdim=True)) * dense_part


def sparse_weight(keys: torch.Tensor, resolution: int, points: torch.Tensor) -> torch.Tensor:
    """How much of each point's blended feature comes from the sparse grid, [N] in [0, 1]."""
    if len(keys) == 0:
        return points.new_zeros(len(points))
    found, _, weights = _sparse_neighbours(keys, resolution, points)
    return (weights * found).sum(1)


def _trunk(channels: int, config: FieldConfig) -> tuple[nn.Sequential, int]:
    """The hidden layers from `channels` features, and their output width."""
    layers: list[nn.Module] = []
    width = channels
    for _ in range(config.hidden_layers):
        # SiLU, not ReLU: the SDF's gradient (normals) and second derivative (eikonal loss) stay smooth.
        layers += [nn.Linear(width, config.hidden), nn.SiLU()]
        width = config.hidden
    return nn.Sequential(*layers), width


class FieldDecoder(nn.Module):
    """Small MLP heads from interpolated features [N, C] to a FieldSample (LSRM eq. 10-12).

    The transformer reuses this module on its own feature volumes, so it depends on features only.
    """

    def __init__(self, config: FieldConfig) -> None:
        super().__init__()
        split = config.geometry_channels
        if not 0 <= split < config.channels:
            raise ValueError(f"geometry_channels must lie in [0, {config.channels}), got {split}")
        self.split = split
        self.trunk, width = _trunk(config.channels - split, config)
        self.geometry_trunk, geometry_width = _trunk(split, config) if split else (None, width)
        self.geometry = nn.Linear(geometry_width, 2)  # sdf, effective offset
        self.material = nn.Linear(width, 5)  # albedo (3), roughness, metallic
        self.radiance = nn.Linear(width, 3) if config.radiance else None
        self.colour = None
        if config.colour_skip:
            with torch.random.fork_rng(devices=[]):  # set below, so the other weights of a seed stay the same
                self.colour = nn.Linear(COLOUR_CHANNELS, 3)
            with torch.no_grad():
                self.colour.weight.copy_(torch.eye(COLOUR_CHANNELS) * COLOUR_SKIP_GAIN)
                self.colour.bias.fill_(COLOUR_SKIP_OFFSET)
        self.max_offset = config.max_offset
        # The offset starts at exactly zero, so a fresh field renders its own SDF.
        nn.init.zeros_(self.geometry.weight[1])
        nn.init.zeros_(self.geometry.bias[1])

    def _geometry(self, features: torch.Tensor) -> torch.Tensor:
        if self.geometry_trunk is None:
            return self.geometry(self.trunk(features))
        return self.geometry(self.geometry_trunk(features[:, : self.split]))

    def sdf(self, features: torch.Tensor) -> torch.Tensor:
        return self._geometry(features)[:, 0]

    def forward(self, features: torch.Tensor) -> FieldSample:
        if self.geometry_trunk is None:
            hidden = self.trunk(features)
            geometry = self.geometry(hidden)
        else:
            hidden = self.trunk(features[:, self.split :])
            geometry = self._geometry(features)
        material = self.material(hidden)
        if self.colour is not None:
            material = material + F.pad(self.colour(features[:, -COLOUR_CHANNELS:]), (0, 2))  # albedo logits only
        material = torch.sigmoid(material)
        # The effective offset (after LIRM) shifts the SDF seen by the volume renderer but not the zero
        # level set that becomes the mesh: opacity the grid cannot explain with a clean surface (thin
        # parts below a voxel, soft silhouettes, a beta that is still too wide) goes into the offset
        # instead of bending the geometry. It is bounded, and refinement keeps it small.
        offset = self.max_offset * torch.tanh(geometry[:, 1])
        radiance = F.softplus(self.radiance(hidden)) if self.radiance is not None else None
        return FieldSample(
            sdf=geometry[:, 0],
            albedo=material[:, :3],
            roughness=material[:, 3],
            metallic=material[:, 4],
            radiance=radiance,
            offset=offset,
        )


class FeatureField(nn.Module):
    """Dense low-resolution feature grid plus an optional sparse high-resolution grid near the surface.

    A point reads the sparse voxels where they exist and the dense grid in empty space: each of its 8
    neighbouring fine voxels contributes its own feature if it is active and the dense feature at the
    point otherwise, so the blend on the boundary is linear and the field stays continuous everywhere.
    The sparse grid stores features only for active voxels, as a sorted list of linear voxel indices
    (`sparse_keys`) and one feature row per key; lookups use binary search, never a dense fine volume.
    """

    def __init__(self, config: FieldConfig) -> None:
        super().__init__()
        self.config = config
        r = config.dense_resolution
        self.dense = nn.Parameter(torch.randn(config.channels, r, r, r) * config.init_std)  # [C, x, y, z]
        self.sparse_features = nn.Parameter(torch.zeros(0, config.channels))  # [M, C]
        self.register_buffer("sparse_keys", torch.zeros(0, dtype=torch.long))  # [M] sorted linear indices
        self.decoder = FieldDecoder(config)
        self.log_beta = nn.Parameter(torch.tensor(math.log(config.beta_init - config.beta_min)))

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp() + self.config.beta_min

    @property
    def sparse_count(self) -> int:
        return len(self.sparse_keys)

    def dense_features(self, points: torch.Tensor) -> torch.Tensor:
        """Trilinear read of the dense grid at points [N, 3] -> [N, C]."""
        return read_dense(self.dense, points)

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """Blended dense + sparse features at points [N, 3] -> [N, C]."""
        return read_blended(self.dense, self.sparse_keys, self.sparse_features, self.config.sparse_resolution, points)

    def sparse_mask(self, points: torch.Tensor) -> torch.Tensor:
        """How much of each point's feature comes from the sparse grid, [N] in [0, 1]."""
        return sparse_weight(self.sparse_keys, self.config.sparse_resolution, points)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return self.decoder.sdf(self.features(points))

    def forward(self, points: torch.Tensor) -> FieldSample:
        return self.decoder(self.features(points))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint's sparse grid has its own number of active voxels: take its shape before loading.
        keys = state_dict.get(prefix + "sparse_keys")
        if keys is not None:
            self.sparse_keys = torch.zeros_like(keys, device=self.dense.device)
            self.sparse_features = nn.Parameter(self.dense.new_zeros(len(keys), self.config.channels))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_sparse(self, voxels: torch.Tensor, features: torch.Tensor | None = None) -> None:
        """Make the fine voxels [M, 3] (integer x, y, z) the active set, with features [M, C].

        Without features, each voxel starts from what the field holds at its centre now, so activating
        the sparse grid leaves the field unchanged (a clean start for coarse-to-fine refinement).
        """
        resolution = self.config.sparse_resolution
        voxels = voxels.to(self.dense.device).long()
        if voxels.numel() and (voxels.min() < 0 or voxels.max() >= resolution):
            raise ValueError(f"sparse voxel coordinates must lie in [0, {resolution})")
        keys, first = _unique_sorted(_linear_index(voxels, resolution))
        if features is None:
            with torch.no_grad():
                centres = voxel_centres(voxels[first], resolution)
                features = torch.cat([self.features(c) for c in centres.split(65536)]) if len(keys) else None
            features = features if features is not None else self.dense.new_zeros(0, self.config.channels)
        else:
            if features.shape != (len(voxels), self.config.channels):
                raise ValueError(f"sparse features must be [{len(voxels)}, {self.config.channels}]")
            features = features[first]
        self.sparse_keys = keys
        self.sparse_features = nn.Parameter(features.detach().clone().to(self.dense))

    @torch.no_grad()
    def activate_near_surface(self, band: float | None = None, chunk: int = 65536) -> int:
        """Activate the fine voxels whose centre is within `band` of the current surface; returns their count.

        LSRM eq. 13 keeps voxels near the stage-1 surface. The default band, 1.5 fine-voxel diagonals,
        covers every voxel the zero level set passes through plus a margin for it to move.
        """
        resolution = self.config.sparse_resolution
        voxel = 2.0 / resolution
        band = 1.5 * math.sqrt(3.0) * voxel if band is None else band
        voxels = near_surface_voxels(self.sdf, resolution, band, self.dense.device, chunk)
        self.set_sparse(voxels)
        return len(voxels)


def voxel_centres(voxels: torch.Tensor, resolution: int) -> torch.Tensor:
    """Canonical positions [M, 3] of the centres of integer voxels [M, 3] of a cell-centred grid."""
    return -1.0 + (2.0 * voxels.float() + 1.0) / resolution


def _unique_sorted(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys and, for each, the position of one occurrence in the input."""
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    first = torch.empty(len(unique), dtype=torch.long, device=keys.device)
    first.scatter_(0, inverse, torch.arange(len(keys), device=keys.device))
    return unique, first


@torch.no_grad()
def near_surface_voxels(
    sdf: Callable[[torch.Tensor], torch.Tensor],
    resolution: int,
    band: float,
    device: torch.device | str = "cpu",
    chunk: int = 65536,
) -> torch.Tensor:
    """Integer voxels [M, 3] of a cell-centred grid whose centres have |sdf| < band.

    Coarse to fine, so memory and time follow the surface area, not resolution^3: blocks of 8^3
    voxels are tested at their centres first (with the block's half-diagonal added to the band, which
    is safe for any SDF that is 1-Lipschitz), then only voxels inside surviving blocks.
    """
    block = 8 if resolution % 8 == 0 and resolution >= 16 else 1
    blocks_per_axis = resolution // block
    axis = torch.arange(blocks_per_axis)
    blocks = torch.cartesian_prod(axis, axis, axis)
    half_diagonal = math.sqrt(3.0) * block / resolution
    kept = []
    for part in blocks.split(chunk):
        centres = voxel_centres(part, blocks_per_axis).to(device)
        kept.append(part[(sdf(centres).abs() < band + half_diagonal).cpu()])
    blocks = torch.cat(kept)
    offsets = torch.cartesian_prod(*(torch.arange(block),) * 3)
    voxels = []
    for part in blocks.split(max(1, chunk // len(offsets))):
        candidates = (part[:, None, :] * block + offsets).reshape(-1, 3)
        centres = voxel_centres(candidates, resolution).to(device)
        voxels.append(candidates[(sdf(centres).abs() < band).cpu()])
    return torch.cat(voxels) if voxels else torch.zeros(0, 3, dtype=torch.long)


class GridField:
    """A field whose grids are tensors computed by a model rather than parameters (Engine A's output).

    Reads and decodes exactly like `FeatureField` (the same readers and the model's `FieldDecoder`), and
    stays differentiable in the grids, so training renders it and backpropagates into the transformer.
    """

    def __init__(
        self,
        config: FieldConfig,
        decoder: FieldDecoder,
        dense: torch.Tensor,
        log_beta: torch.Tensor,
        sparse_voxels: torch.Tensor | None = None,
        sparse_features: torch.Tensor | None = None,
    ) -> None:
        """dense [C, R, R, R]; sparse_voxels [M, 3] integer fine voxels with features [M, C] (or None)."""
        self.config, self.decoder, self.dense, self.log_beta = config, decoder, dense, log_beta
        if sparse_voxels is None or len(sparse_voxels) == 0:
            self.sparse_keys = torch.zeros(0, dtype=torch.long, device=dense.device)
            self.sparse_features = dense.new_zeros(0, config.channels)
        else:
            keys, first = _unique_sorted(_linear_index(sparse_voxels.long(), config.sparse_resolution))
            self.sparse_keys, self.sparse_features = keys, sparse_features[first]

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp() + self.config.beta_min

    def features(self, points: torch.Tensor) -> torch.Tensor:
        return read_blended(self.dense, self.sparse_keys, self.sparse_features, self.config.sparse_resolution, points)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return self.decoder.sdf(self.features(points))

    def __call__(self, points: torch.Tensor) -> FieldSample:
        return self.decoder(self.features(points))

    def detached(self) -> GridField:
        """A float32 copy cut from the autograd graph (what export and refinement take)."""
        field = copy.copy(self)
        field.dense, field.log_beta = self.dense.detach().float(), self.log_beta.detach().float()
        field.sparse_features = self.sparse_features.detach().float()
        return field

    def to_feature_field(self) -> FeatureField:
        """A detached, trainable copy (the start of a refinement: `--engine both`)."""
        field = FeatureField(self.config).to(self.dense.device)
        field.decoder.load_state_dict(self.decoder.state_dict())
        with torch.no_grad():
            field.dense.copy_(self.dense.float())
            field.log_beta.copy_(self.log_beta.float())
        field.sparse_keys = self.sparse_keys.clone()
        field.sparse_features = nn.Parameter(self.sparse_features.detach().float().clone())
        return field

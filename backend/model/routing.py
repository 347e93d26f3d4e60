"""Block routing for native sparse attention: which key blocks each query reads (LSRM §3.1, §3.4).

Two routings, behind one switch in the model:
- `score_routing`, the original NSA selection: a query's attention scores against the compressed
  block keys rank the blocks.
- 3D-aware routing from the stage-1 geometry: `route_to_volume` picks the volume blocks whose
  centres are nearest the query's 3D point; `route_to_image` projects the query into every view,
  takes the image blocks nearest the projection in each view, and keeps those whose token points
  come closest to the query in 3D.

Every function returns global block indices padded with -1 (an object may have fewer blocks than
asked for), breaks ties towards the lower block index, works object by object in chunks of
queries, and runs without gradients: selection is not differentiable.
"""

from __future__ import annotations

import torch

from backend.cameras import Cameras, project
from backend.model.blocks import TokenBlocks

# Elements allowed in the largest per-chunk intermediate of a routing search.
_ELEMENT_BUDGET = 1 << 26


def per_kv_head(selected: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Share one block list per query [Nq, n] across KV heads: [Nq, Hkv, n] (an expanded view)."""
    return selected[:, None, :].expand(-1, kv_heads, -1)


@torch.no_grad()
def score_routing(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    q_token_cu: torch.Tensor,
    block_cu: torch.Tensor,
    top_n: int,
    scale: float | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """NSA's selection: the top_n blocks of the query's object by importance, per KV head: [Nq, Hkv, n].

    q [Nq, Hq, D]; k_cmp [Bk, Hkv, D] compressed block keys. A block's importance for a query and
    KV head is its softmax probability (over the object's blocks, per query head, in float32)
    summed over the query heads of that GQA group. Scores are computed in float32 at least.
    """
    num_queries, q_heads, head_dim = q.shape
    kv_heads = k_cmp.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    selected = torch.full((num_queries, kv_heads, top_n), -1, dtype=torch.long, device=q.device)
    dtype = torch.promote_types(q.dtype, torch.float32)
    for q_start, q_end, b_start, b_end in _object_ranges(q_token_cu, block_cu):
        if b_end == b_start or q_end == q_start:
            continue
        keys = k_cmp[b_start:b_end].to(dtype).permute(1, 2, 0)  # [Hkv, D, Bi]
        chunk = _chunk(chunk_size, q_heads * (b_end - b_start), q_end - q_start)
        for s in range(q_start, q_end, chunk):
            e = min(s + chunk, q_end)
            grouped = q[s:e].to(dtype).view(e - s, kv_heads, -1, head_dim)  # [C, Hkv, G, D]
            probs = torch.softmax(torch.matmul(grouped, keys) * scale, dim=-1)  # [C, Hkv, G, Bi]
            importance = probs.sum(dim=2)  # [C, Hkv, Bi]
            selected[s:e] = _shift(_smallest(-importance, top_n), b_start)
    return selected


@torch.no_grad()
def route_to_volume(
    query_xyz: torch.Tensor,
    block_centres: torch.Tensor,
    q_token_cu: torch.Tensor,
    block_cu: torch.Tensor,
    top_n: int,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The top_n blocks of the query's object whose centres are nearest its 3D point: [Nq, n].

    query_xyz [Nq, 3]; block_centres [Bk, 3] (e.g. `TokenBlocks.centres` of the volume tokens).
    """
    selected = torch.full((query_xyz.shape[0], top_n), -1, dtype=torch.long, device=query_xyz.device)
    for q_start, q_end, b_start, b_end in _object_ranges(q_token_cu, block_cu):
        if b_end == b_start or q_end == q_start:
            continue
        centres = block_centres[b_start:b_end]
        chunk = _chunk(chunk_size, 3 * (b_end - b_start), q_end - q_start)
        for s in range(q_start, q_end, chunk):
            e = min(s + chunk, q_end)
            distance = _squared_distance(query_xyz[s:e, None, :], centres[None])  # [C, Bi]
            selected[s:e] = _shift(_smallest(distance, top_n), b_start)
    return selected


@torch.no_grad()
def route_to_image(
    query_xyz: torch.Tensor,
    token_xyz: torch.Tensor,
    blocks: TokenBlocks,
    block_centre_px: torch.Tensor,
    cameras: list[Cameras],
    q_token_cu: torch.Tensor,
    per_view: int,
    top_n: int,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """LSRM's volume/image-to-image routing: the top_n image blocks nearest the query in 3D: [Nq, n].

    query_xyz [Nq, 3]: the queries' 3D points, objects contiguous as in q_token_cu [B + 1].
    token_xyz [Nk, 3]: the 3D point of each image token, in block (sorted) order.
    blocks: the image tokens' partition, block_coords (view, block_row, block_col).
    block_centre_px [Bk, 2]: the (x, y) pixel centre of each image block.
    cameras: per object, its views; block_coords[:, 0] indexes them.

    For each view in front of which the query lies (positive depth), the `per_view` blocks of that
    view whose 2D centres are nearest the query's projection become candidates; each candidate is
    scored by the smallest 3D distance between the query and the block's token points, and the
    top_n candidates with the smallest score are kept.
    """
    if len(cameras) != blocks.num_objects or q_token_cu.numel() != blocks.num_objects + 1:
        raise ValueError("cameras and q_token_cu must describe the same objects as the image blocks")
    device = query_xyz.device
    selected = torch.full((query_xyz.shape[0], top_n), -1, dtype=torch.long, device=device)
    block_sizes = blocks.block_sizes
    max_len = int(block_sizes.max()) if block_sizes.numel() else 0
    views_of_block = blocks.block_coords[:, 0].contiguous()
    for obj, (q_start, q_end, b_start, b_end) in enumerate(_object_ranges(q_token_cu, blocks.block_cu)):
        if b_end == b_start or q_end == q_start:
            continue
        views = len(cameras[obj])
        # Blocks are sorted by (view, row, col) inside an object, so each view's blocks are a range.
        view_bounds = torch.searchsorted(views_of_block[b_start:b_end], torch.arange(views + 1, device=device))
        view_bounds = (view_bounds + b_start).tolist()
        chunk = _chunk(chunk_size, views * per_view * max(max_len, 1) * 3, q_end - q_start)
        for s in range(q_start, q_end, chunk):
            e = min(s + chunk, q_end)
            points = query_xyz[s:e]  # [C, 3]
            uv, depth = project(cameras[obj], points)  # [V, C, 2], [V, C]
            candidates = []
            for view in range(views):
                v_start, v_end = view_bounds[view], view_bounds[view + 1]
                if v_end == v_start:
                    continue
                centres = block_centre_px[v_start:v_end].to(uv)
                nearest = _smallest(_squared_distance(uv[view, :, None, :], centres[None]), per_view)  # [C, pv]
                nearest = _shift(nearest, v_start)
                candidates.append(nearest.masked_fill(depth[view, :, None] <= 0, -1))  # behind the camera
            if not candidates:
                continue
            candidates = torch.cat(candidates, dim=1)  # [C, V * pv]
            distance = _min_block_distance(points, candidates, token_xyz, blocks.block_offsets, max_len)
            # Candidates of different views are distinct blocks; sort them by index first so that the
            # stable sort by distance breaks ties towards the lower block index.
            candidates, by_index = candidates.masked_fill(candidates < 0, torch.iinfo(torch.long).max).sort(dim=1)
            distance = distance.gather(1, by_index)
            best = _smallest(distance, top_n)  # positions in candidates, -1 past the valid ones
            chosen = candidates.gather(1, best.clamp_min(0))
            selected[s:e] = torch.where(best >= 0, chosen, -1)
    return selected


def _min_block_distance(
    points: torch.Tensor,
    candidates: torch.Tensor,
    token_xyz: torch.Tensor,
    block_offsets: torch.Tensor,
    max_len: int,
) -> torch.Tensor:
    """Smallest squared 3D distance [C, M] from each point [C, 3] to the tokens of its candidate blocks.

    candidates [C, M] global block indices, -1 for none (distance +inf, as for an empty block).
    """
    if max_len == 0:
        return torch.full(candidates.shape, float("inf"), dtype=points.dtype, device=points.device)
    valid = candidates >= 0
    safe = candidates.clamp_min(0)
    starts = block_offsets[safe]  # [C, M]
    lengths = torch.where(valid, block_offsets[safe + 1] - starts, 0)
    offsets = torch.arange(max_len, device=points.device)
    in_block = offsets < lengths[..., None]  # [C, M, L]
    rows = torch.where(in_block, starts[..., None] + offsets, 0)
    distance = _squared_distance(points[:, None, None, :], token_xyz[rows].to(points))  # [C, M, L]
    return distance.masked_fill(~in_block, float("inf")).amin(dim=-1)


def _squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance over the last dim, by explicit differences (exact, unlike cdist's expansion)."""
    return ((a - b) ** 2).sum(dim=-1)


def _smallest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Positions [..., count] of the `count` smallest finite scores along the last dim, ascending.

    Ties go to the lower position; slots past the finite scores are -1. A selection (topk), not a
    sort of every score: the routing searches rank thousands of blocks per query to keep a few.
    """
    take = min(count, score.shape[-1])
    order = score.new_zeros((*score.shape[:-1], 0), dtype=torch.long)
    if take:
        kth = score.topk(take, dim=-1, largest=False).values.amax(dim=-1, keepdim=True)  # the take-th smallest
        below, at = score < kth, score == kth
        room = take - below.sum(dim=-1, keepdim=True)
        keep = below | (at & (at.cumsum(dim=-1) <= room))  # exactly `take` a row; ties to lower positions
        position = torch.arange(score.shape[-1], device=score.device).expand_as(score)
        # The kept positions, ascending, by a second selection (boolean indexing would wait for the GPU).
        chosen = torch.where(keep, position, position + score.shape[-1]).topk(take, dim=-1, largest=False).values
        by_score = torch.sort(score.gather(-1, chosen), dim=-1, stable=True).indices  # stable: lower position first
        order = chosen.gather(-1, by_score)
    finite = torch.isfinite(score.gather(-1, order))
    order = torch.where(finite, order, -1)
    missing = count - order.shape[-1]
    if missing > 0:
        order = torch.cat([order, order.new_full((*order.shape[:-1], missing), -1)], dim=-1)
    return order


def _shift(positions: torch.Tensor, start: int) -> torch.Tensor:
    """Local positions to global block indices, keeping -1 for an empty slot."""
    return torch.where(positions >= 0, positions + start, -1)


def _object_ranges(q_token_cu: torch.Tensor, block_cu: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(query start, query end, block start, block end) of each object."""
    q_bounds, b_bounds = q_token_cu.tolist(), block_cu.tolist()
    if len(q_bounds) != len(b_bounds):
        raise ValueError(f"q_token_cu has {len(q_bounds) - 1} objects but block_cu has {len(b_bounds) - 1}")
    return [(q_bounds[i], q_bounds[i + 1], b_bounds[i], b_bounds[i + 1]) for i in range(len(q_bounds) - 1)]


def _chunk(chunk_size: int | None, per_query_elements: int, num_queries: int) -> int:
    if chunk_size is None:
        chunk_size = _ELEMENT_BUDGET // max(per_query_elements, 1)
    return max(1, min(chunk_size, num_queries))

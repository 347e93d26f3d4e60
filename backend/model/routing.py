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

from collections.abc import Iterator

import torch

from backend.cameras import Cameras, project
from backend.model.blocks import TokenBlocks

# Elements allowed in the largest per-chunk intermediate of a routing search.
_ELEMENT_BUDGET = 1 << 26
# Consecutive queries that share one candidate search in `route_to_volume` (neighbours in space).
_GROUP = 32


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
            # One GEMM per KV head over all its query rows (a broadcast matmul would copy the keys per query).
            rows = q[s:e].to(dtype).view(e - s, kv_heads, -1, head_dim).transpose(0, 1).reshape(kv_heads, -1, head_dim)
            probs = torch.softmax(torch.bmm(rows, keys) * scale, dim=-1)  # [Hkv, C * G, Bi]
            importance = probs.view(kv_heads, e - s, -1, b_end - b_start).sum(dim=2).transpose(0, 1)  # [C, Hkv, Bi]
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

    Exact, without measuring every query against every block: queries go in runs of `_GROUP`
    neighbours along a Z-order curve, each run rules out by its bounding box the blocks that cannot
    be among any of its queries' top_n (`_candidates`), and each query ranks only the rest.
    chunk_size: queries per chunk (rounded to whole runs), else an element budget.
    """
    selected = torch.full((query_xyz.shape[0], top_n), -1, dtype=torch.long, device=query_xyz.device)
    for q_start, q_end, b_start, b_end in _object_ranges(q_token_cu, block_cu):
        if b_end == b_start or q_end == q_start:
            continue
        centres = block_centres[b_start:b_end]
        runs = _runs(query_xyz[q_start:q_end]) + q_start  # [G, _GROUP] query rows, neighbours in space
        candidates, counts = _candidates(query_xyz[runs], centres, top_n)  # [G, K] local blocks, ascending
        for chosen_runs, width in _chunks_by_width(counts, chunk_size):
            rows = runs[chosen_runs].flatten()
            mine = candidates[chosen_runs, :width].repeat_interleave(_GROUP, dim=0)  # [C, width]
            distance = _squared_distance(query_xyz[rows, None, :], centres[mine.clamp_min(0)])
            best = _smallest(distance.masked_fill(mine < 0, float("inf")), top_n)
            chosen = mine.gather(1, best.clamp_min(0))
            selected[rows] = torch.where(best >= 0, chosen + b_start, -1)
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
    boxes = _token_boxes(token_xyz.to(query_xyz.dtype), blocks.block_offsets, max_len)
    for obj, (q_start, q_end, b_start, b_end) in enumerate(_object_ranges(q_token_cu, blocks.block_cu)):
        if b_end == b_start or q_end == q_start:
            continue
        # Blocks are sorted by (view, row, col) inside an object, so each view's blocks are a range; a
        # table [V, P] of them (-1 past a view's count) ranks all views in one search.
        bounds = torch.searchsorted(views_of_block[b_start:b_end], torch.arange(len(cameras[obj]) + 1, device=device))
        sizes = bounds.diff()
        slot = torch.arange(int(sizes.max()), device=device)
        table = torch.where(slot < sizes[:, None], bounds[:-1, None] + slot + b_start, -1)  # [V, P]
        table_px = block_centre_px[table.clamp_min(0)].masked_fill((table < 0)[..., None], float("inf"))
        per_query = max(table.numel() * 2, per_view * len(table) * max(max_len, 1) * 3)
        chunk = _chunk(chunk_size, per_query, q_end - q_start)
        for s in range(q_start, q_end, chunk):
            e = min(s + chunk, q_end)
            points = query_xyz[s:e]  # [C, 3]
            uv, depth = project(cameras[obj], points)  # [V, C, 2], [V, C]
            nearest = _smallest(_squared_distance(uv[:, :, None, :], table_px[:, None].to(uv)), per_view)
            candidates = torch.where(
                nearest >= 0, table.gather(1, nearest.clamp_min(0).flatten(1)).view_as(nearest), -1
            )
            candidates = candidates.masked_fill(depth[..., None] <= 0, -1)  # behind the camera
            candidates = candidates.transpose(0, 1).flatten(1)  # [C, V * pv]
            # Only the candidates that can make the top_n get their exact distance; the rest stay +inf.
            keep = _may_rank(points, candidates, boxes, top_n)
            width = int(keep.sum(1).max())
            first_kept = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices[:, :width]  # [C, W]
            kept = candidates.gather(1, first_kept).masked_fill(~keep.gather(1, first_kept), -1)
            exact = _min_block_distance(points, kept, token_xyz, blocks.block_offsets, max_len)
            distance = torch.full(candidates.shape, float("inf"), dtype=exact.dtype, device=device)
            distance = distance.scatter(1, first_kept, exact)
            # Candidates of different views are distinct blocks; sort them by index first so that the
            # stable sort by distance breaks ties towards the lower block index.
            candidates, by_index = candidates.masked_fill(candidates < 0, torch.iinfo(torch.long).max).sort(dim=1)
            distance = distance.gather(1, by_index)
            best = _smallest(distance, top_n)  # positions in candidates, -1 past the valid ones
            chosen = candidates.gather(1, best.clamp_min(0))
            selected[s:e] = torch.where(best >= 0, chosen, -1)
    return selected


def _token_boxes(
    token_xyz: torch.Tensor, block_offsets: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block [Bk, 3]: the bounding box (low, high) of its token points and its first token's point."""
    starts = block_offsets[:-1]
    in_block = torch.arange(max(max_len, 1), device=starts.device) < (block_offsets[1:] - starts)[:, None]
    points = token_xyz[
        torch.where(in_block, starts[:, None] + torch.arange(in_block.shape[1], device=starts.device), 0)
    ]
    low = points.masked_fill(~in_block[..., None], float("inf")).amin(1)
    high = points.masked_fill(~in_block[..., None], float("-inf")).amax(1)
    return low, high, token_xyz[starts.clamp_max(max(len(token_xyz) - 1, 0))]


def _may_rank(
    points: torch.Tensor, candidates: torch.Tensor, boxes: tuple[torch.Tensor, ...], top_n: int
) -> torch.Tensor:
    """[C, M] True for the candidate blocks [C, M] (-1 none) that can be among a point's top_n nearest.

    A block is ruled out when the nearest its token box can be is beyond the top_n-th smallest distance
    to the candidates' first tokens (each block's smallest distance is at most that), widened by the
    rounding of the exact distances (relative, a few units in the last place) as in `_candidates`.
    """
    valid = candidates >= 0
    if candidates.shape[1] <= top_n:
        return valid
    low, high, first = (x[candidates.clamp_min(0)] for x in boxes)  # [C, M, 3]
    p = points[:, None, :]
    nearest = ((low - p).clamp_min(0) + (p - high).clamp_min(0)).square().sum(-1)
    reach = _squared_distance(p, first).masked_fill(~valid, float("inf"))
    bound = reach.topk(top_n, dim=1, largest=False).values[:, -1:]
    info = torch.finfo(points.dtype)
    return valid & (nearest <= bound * (1.0 + 16 * info.eps) + 64 * info.tiny)


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

    Ties go to the lower position; slots past the finite scores are -1. One selection (topk) over
    keys that hold a score's order above its position, so every key is distinct and a tie resolves
    by position with no sort; float64 scores (no room left for the position) take a stable sort.
    """
    take = min(count, score.shape[-1])
    if score.dtype == torch.float64:
        order = torch.sort(score, dim=-1, stable=True).indices[..., :take]
    else:
        order = _ranked_keys(score).topk(take, dim=-1, largest=False).values & 0xFFFFFFFF
    finite = torch.isfinite(score.gather(-1, order))
    order = torch.where(finite, order, -1)
    missing = count - order.shape[-1]
    if missing > 0:
        order = torch.cat([order, order.new_full((*order.shape[:-1], missing), -1)], dim=-1)
    return order


def _ranked_keys(score: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like (score, position) along the last dim: the float32 score's bits made
    monotonic (sign-magnitude to two's complement) in the high half, the position in the low half.
    -0.0 becomes 0.0 (they tie) and NaN ranks as +inf (never finite, so never chosen)."""
    value = score.float() + 0.0
    bits = torch.where(value.isnan(), float("inf"), value).view(torch.int32).long()
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered << 32) | torch.arange(score.shape[-1], device=score.device)


def _runs(points: torch.Tensor) -> torch.Tensor:
    """Rows of points [N, 3] in runs [G, _GROUP] of neighbours, each padded with its first row.

    The points in Z-order (10 bits per axis over their bounding box), cut at every cell of the finest
    octree level whose occupied cells hold `_GROUP` / 2 points on average, and after `_GROUP` rows:
    cells bound a run's extent (the curve alone jumps across the box now and then).
    """
    low, high = points.amin(0), points.amax(0)
    cells = ((points - low) / (high - low).clamp_min(1e-12) * 1023).long().clamp(0, 1023)
    code = _spread_bits(cells[:, 0]) | _spread_bits(cells[:, 1]) << 1 | _spread_bits(cells[:, 2]) << 2
    code, order = code.sort()
    shifts = range(0, 31, 3)  # octree levels, finest first
    occupied = torch.stack([((code[1:] >> s) != (code[:-1] >> s)).sum() + 1 for s in shifts]).tolist()
    shift = next((s for s, n in zip(shifts, occupied, strict=True) if n * _GROUP <= 2 * len(code)), shifts[-1])
    first = torch.ones_like(code, dtype=torch.bool)
    first[1:] = (code[1:] >> shift) != (code[:-1] >> shift)
    starts = first.nonzero()[:, 0]
    position = torch.arange(len(code), device=code.device) - starts[first.cumsum(0) - 1]  # within the cell
    run = (first | (position % _GROUP == 0)).cumsum(0) - 1
    runs = torch.full((int(run[-1]) + 1, _GROUP), -1, dtype=torch.long, device=code.device)
    runs[run, position % _GROUP] = order
    return torch.where(runs < 0, runs[:, :1], runs)


def _spread_bits(x: torch.Tensor) -> torch.Tensor:
    """The 10 low bits of x spread to every third bit (bit i to bit 3i), for Z-order codes."""
    x = (x | x << 16) & 0x030000FF
    x = (x | x << 8) & 0x0300F00F
    x = (x | x << 4) & 0x030C30C3
    return (x | x << 2) & 0x09249249


def _candidates(runs: torch.Tensor, centres: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each run of points [G, R, 3], the blocks that can be among the top_n nearest centres [B, 3] of
    any of its points: local indices [G, K], ascending, -1 past the run's count, and the counts [G].

    A block is ruled out when the nearest it can be to the run's bounding box is beyond the top_n-th
    smallest farthest that blocks can be: then top_n other blocks are strictly nearer every point of the
    run. The rule is widened by the rounding of the distances the ranking computes (a few units in the
    last place, relative), so rounding cannot let a ruled-out block win.
    """
    dtype = torch.promote_types(torch.promote_types(runs.dtype, centres.dtype), torch.float32)
    low, high = runs.to(dtype).amin(1)[:, None], runs.to(dtype).amax(1)[:, None]  # [G, 1, 3]
    c = centres.to(dtype)[None]  # [1, B, 3]
    slack, floor = 1.0 + 16 * torch.finfo(dtype).eps, 64 * torch.finfo(dtype).tiny
    keep, chunk = [], _chunk(None, 3 * len(centres), len(runs))
    for s in range(0, len(runs), chunk):
        lo, hi = low[s : s + chunk], high[s : s + chunk]
        nearest = ((lo - c).clamp_min(0) + (c - hi).clamp_min(0)).square().sum(-1)  # [g, B]
        bound = torch.full_like(nearest[:, :1], float("inf"))
        if len(centres) > top_n:
            farthest = torch.maximum((c - lo).abs(), (c - hi).abs()).square().sum(-1)
            bound = farthest.topk(top_n, dim=-1, largest=False).values[:, -1:]
        keep.append(nearest <= bound * slack + floor)
    keep = torch.cat(keep)
    counts = keep.sum(1)
    run, block = keep.nonzero(as_tuple=True)  # row-major: ascending blocks within each run
    slot = torch.arange(len(block), device=block.device) - (counts.cumsum(0) - counts)[run]
    candidates = torch.full((len(runs), int(counts.max())), -1, dtype=torch.long, device=block.device)
    candidates[run, slot] = block
    return candidates, counts


def _chunks_by_width(counts: torch.Tensor, chunk_size: int | None) -> Iterator[tuple[torch.Tensor, int]]:
    """Runs in chunks of similar candidate counts (at most 3/2 of the chunk's narrowest plus 8, so little of a
    chunk is padding) under the element budget or `chunk_size` queries: (run indices, the widest count)."""
    widths, by_width = counts.sort()
    widths = widths.tolist()
    start = 0
    while start < len(widths):
        end = start + 1
        while (
            end < len(widths)
            and widths[end] <= 1.5 * widths[start] + 8
            and (end + 1 - start) * _GROUP <= _chunk(chunk_size, 3 * widths[end], 1 << 62)
        ):
            end += 1
        yield by_width[start:end], widths[end - 1]
        start = end


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

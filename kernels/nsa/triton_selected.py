"""Selected-block attention in Triton, forward and backward (the per-query mode of NSA).

Same semantics as `kernels.nsa.reference.selected_attention`, plus the log-sum-exp of each query
head's scores (natural log, -inf for a query head without any key) for mixing branches.

Work split (G = Hq // Hkv query heads share a KV head and are loaded together as one tile):
- forward and dq: one program per tile of T consecutive queries and one KV head owns a [T*G, D]
  query tile and walks the union of the tile's block lists as one flat loop of 64-key steps
  (`block_lists.key_steps`); rows skip the blocks their query did not choose (a bit set per block).
  T = 1 is the plain per-query kernel; T > 1 pays off when neighbouring queries share most blocks
  (3D routing), and `choose_tile` picks it from a cheap sample of the lists. Blocks have any size:
  unpacked, a block costs ceil(size / 64) steps; packed (chosen where it saves steps), the keys of
  up to 8 small blocks share one step, each lane finding its block in the kernel.
- dk and dv: one program per key block and KV head walks the queries that chose the block (the
  selection inverted into CSR lists, `block_lists.block_queries`), a few queries at a time, so every
  key gradient is written once, without atomics, deterministically.
q is multiplied by scale * log2(e) once, so scores are in log2 units for exp2. Launch configurations
are autotuned per shape (`_launch`).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.nsa.block_lists import KeySteps, Selection, block_queries, key_steps, sharing

LOG2E = 1.4426950408889634
TILE_ROWS = 64  # query rows (T * G) of a program when neighbouring queries are tiled together
SHARING_LIMIT = 0.6  # tile queries when the union costs under this fraction of the separate lists
MAX_TILE = 16  # queries per program: each entry's chooser set is a 32-bit mask


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation; UPCAST for the CPU interpreter, whose dot cannot read bfloat16."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _scaled(x, scale, UPCAST: tl.constexpr):
    """x * scale, rounded back to x's dtype for the tensor cores (the interpreter keeps float32)."""
    y = x.to(tl.float32) * scale
    if not UPCAST:
        y = y.to(x.dtype)
    return y


@triton.jit
def _query_tile(
    Q, num_queries, kv_heads, stride_q, scale_log2,
    G: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """This program's tile of T queries x the G query heads of KV head h, as ROWS rows: h, the program's
    index over (tile, KV head), each row's query and head, which rows exist, the head dims, and q scaled
    so that scores come out in log2 units (exp2 without a multiply per score)."""
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    query = tile * T + rows // G
    head = h * G + rows % G
    row_ok = (rows < T * G) & (query < num_queries)
    dims = tl.arange(0, D)
    q = tl.load(Q + query[:, None] * stride_q + head[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    return h, tile * kv_heads + h, query, head, row_ok, dims, _scaled(q, scale_log2, UPCAST)


@triton.jit
def _step_keys(
    START, SHIFT, SIZE, MEMBERS, entries, count, first, step,
    G: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """One step's lanes: key rows [BLOCK_K] int64 and which (row, lane) pairs attend [ROWS, BLOCK_K]."""
    lane = step * BLOCK_K + tl.arange(0, BLOCK_K)
    if WINDOW == 1:  # unpacked: the step lies inside one block
        start = tl.load(START + entries + first)
        key = lane + tl.load(SHIFT + entries + first)
        ok = lane - start < tl.load(SIZE + entries + first)
        if T > 1:
            bits = tl.load(MEMBERS + entries + first)
    else:  # packed: each lane's block is the last of the window's blocks starting at or before it
        window = first + tl.arange(0, WINDOW)
        starts = tl.load(START + entries + window, mask=window < count, other=2147483647)
        entry = first + tl.sum((starts[None, :] <= lane[:, None]).to(tl.int32), axis=1) - 1
        key = lane + tl.load(SHIFT + entries + entry)
        ok = lane - tl.load(START + entries + entry) < tl.load(SIZE + entries + entry)
        if T > 1:
            bits = tl.load(MEMBERS + entries + entry)
    if T > 1:  # rows of queries that did not choose the lane's block do not attend it
        chooser = tl.arange(0, ROWS) // G
        take = (((bits >> chooser[:, None]) & 1) != 0) & ok[None, :]
    else:
        take = tl.broadcast_to(ok[None, :], (ROWS, BLOCK_K))
    return key.to(tl.int64), ok, take


@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE, START, SHIFT, SIZE, MEMBERS, COUNTS, FIRST, STEPS,
    num_queries, width, max_steps, kv_heads,
    stride_q, stride_k, stride_v, stride_o,
    scale_log2,
    G: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    BLOCK_K: tl.constexpr, WINDOW: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    h, program, query, head, row_ok, dims, q = _query_tile(
        Q, num_queries, kv_heads, stride_q, scale_log2, G, T, ROWS, D, UPCAST
    )
    m = tl.full([ROWS], -1.0e30, tl.float32)  # finite: a row without keys keeps p = 0, never NaN
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    entries = program * width
    count = tl.load(COUNTS + program)
    for step in range(tl.load(STEPS + program)):
        first = step if DIRECT else tl.load(FIRST + program * max_steps + step)
        key, ok, take = _step_keys(
            START, SHIFT, SIZE, MEMBERS, entries, count, first, step, G, T, ROWS, BLOCK_K, WINDOW
        )
        kt = tl.load(K + key[None, :] * stride_k + h * D + dims[:, None], mask=ok[None, :], other=0.0)
        vv = tl.load(V + key[:, None] * stride_v + h * D + dims[None, :], mask=ok[:, None], other=0.0)
        s = tl.where(take, _dot(q, kt, PRECISION, UPCAST), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, PRECISION, UPCAST)
        m = m_new
    has_key = total > 0
    out = acc / tl.where(has_key, total, 1.0)[:, None]
    lse = tl.where(has_key, (m + tl.log2(tl.where(has_key, total, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(O + query[:, None] * stride_o + head[:, None] * D + dims[None, :], out, mask=row_ok[:, None])
    tl.store(LSE + query * (kv_heads * G) + head, lse, mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, START, SHIFT, SIZE, MEMBERS, COUNTS, FIRST, STEPS,
    num_queries, width, max_steps, kv_heads,
    stride_q, stride_k, stride_v, stride_do, stride_dq,
    scale, scale_log2,
    G: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    BLOCK_K: tl.constexpr, WINDOW: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    h, program, query, head, row_ok, dims, q = _query_tile(
        Q, num_queries, kv_heads, stride_q, scale_log2, G, T, ROWS, D, UPCAST
    )
    do = tl.load(DO + query[:, None] * stride_do + head[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE2 + query * (kv_heads * G) + head, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + query * (kv_heads * G) + head, mask=row_ok, other=0.0)
    dq = tl.zeros([ROWS, D], tl.float32)
    entries = program * width
    count = tl.load(COUNTS + program)
    for step in range(tl.load(STEPS + program)):
        first = step if DIRECT else tl.load(FIRST + program * max_steps + step)
        key, ok, take = _step_keys(
            START, SHIFT, SIZE, MEMBERS, entries, count, first, step, G, T, ROWS, BLOCK_K, WINDOW
        )
        kk = tl.load(K + key[:, None] * stride_k + h * D + dims[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(V + key[:, None] * stride_v + h * D + dims[None, :], mask=ok[:, None], other=0.0)
        p = tl.where(take, tl.exp2(_dot(q, tl.trans(kk), PRECISION, UPCAST) - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(vv), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kk.dtype), kk, PRECISION, UPCAST)
    tl.store(DQ + query[:, None] * stride_dq + head[:, None] * D + dims[None, :], dq * scale, mask=row_ok[:, None])


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, OFFSETS, POINTERS, QUERIES,
    num_blocks, kv_heads,
    stride_q, stride_k, stride_v, stride_do, stride_dk, stride_dv,
    scale, scale_log2,
    G: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    start = tl.load(OFFSETS + block)
    end = tl.load(OFFSETS + block + 1)
    first_entry = tl.load(POINTERS + h * num_blocks + block)
    last_entry = tl.load(POINTERS + h * num_blocks + block + 1)
    rows = tl.arange(0, ROWS)
    head = h * G + rows % G
    dims = tl.arange(0, D)
    for first in range(start, end, BLOCK_K):
        cols = first + tl.arange(0, BLOCK_K)
        col_ok = cols < end
        kk = tl.load(K + cols[:, None] * stride_k + h * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        vv = tl.load(V + cols[:, None] * stride_v + h * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_K, D], tl.float32)
        dv = tl.zeros([BLOCK_K, D], tl.float32)
        for entry in range(first_entry, last_entry, QB):
            position = entry + rows // G
            row_ok = (rows < QB * G) & (position < last_entry)
            query = tl.load(QUERIES + position, mask=row_ok, other=0).to(tl.int64)
            q = tl.load(
                Q + query[:, None] * stride_q + head[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0
            )
            do = tl.load(
                DO + query[:, None] * stride_do + head[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0
            )
            lse2 = tl.load(LSE2 + query * (kv_heads * G) + head, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + query * (kv_heads * G) + head, mask=row_ok, other=0.0)
            s = _dot(q, tl.trans(kk), PRECISION, UPCAST) * scale_log2
            p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            dp = _dot(do, tl.trans(vv), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
        tl.store(DK + cols[:, None] * stride_dk + h * D + dims[None, :], dk * scale, mask=col_ok[:, None])
        tl.store(DV + cols[:, None] * stride_dv + h * D + dims[None, :], dv, mask=col_ok[:, None])


# Launch configurations, tried once per kernel and key on the GPU (every kernel overwrites its outputs,
# so the tuning runs are harmless); few, since each costs a compile. A 16-row tile (one query's GQA
# group) is too small to feed 4+ warps, so small tiles try fewer warps; the interpreter takes one config.
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((1, 2), (2, 2), (2, 3), (4, 2), (4, 3), (8, 2))]
_TUNING_KEY = ["G", "T", "ROWS", "D", "BLOCK_K", "WINDOW", "DIRECT"]
_tuned: dict = {}


def _fitting_warps(configs: list, named_args: dict, **constants) -> list:
    """Warps that a tile of ROWS query rows can use: 1-4 for 16-32 rows, 4-8 for 64+."""
    rows = constants.get("ROWS", named_args.get("ROWS", 64))
    fits = [c for c in configs if (c.num_warps <= 4 if rows <= 32 else c.num_warps >= 4)]
    return fits or configs


# dk/dv also tunes its query rows per step (ROWS = QB queries x G heads; fla tunes 1-8 queries too).
_DKDV_CONFIGS = [
    triton.Config({"ROWS": r}, num_warps=w, num_stages=s)
    for r, w, s in ((16, 4, 2), (32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2))
]


def _query_rows(configs: list, named_args: dict, **constants) -> list:
    """The dk/dv configurations with QB = ROWS // G queries, for rows that hold at least one query's heads."""
    group = constants["G"]
    fits = [
        triton.Config({"QB": c.kwargs["ROWS"] // group, **c.kwargs}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in configs
        if c.kwargs["ROWS"] >= group
    ]
    return fits or [triton.Config({"QB": 1, "ROWS": _rows_of(group, 1)}, num_warps=4, num_stages=2)]


def _launch(kernel, grid: tuple[int, int], *args, tuned: dict | None = None, **constants) -> None:
    """Launch autotuned; with one fixed configuration in the interpreter or when LSRM_NSA_AUTOTUNE=0
    (the GPU tests: every configuration computes the same, and tuning them all costs minutes of compiles).

    tuned: the meta-parameters autotuning chooses for this kernel, with the values the fixed configuration uses.
    """
    tuned = tuned or {}
    if _interpreting() or os.environ.get("LSRM_NSA_AUTOTUNE", "1") == "0":
        kernel[grid](*args, **constants, **tuned, num_warps=4, num_stages=2)
        return
    if kernel not in _tuned:
        configs, prune = (_DKDV_CONFIGS, _query_rows) if kernel is _dkdv_kernel else (_CONFIGS, _fitting_warps)
        key = [name for name in _TUNING_KEY if name in kernel.arg_names and name not in tuned]
        _tuned[kernel] = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
    _tuned[kernel][grid](*args, **constants)


def tuned_configs() -> dict[str, dict[str, str]]:
    """The launch configuration autotuning chose, per kernel and tuning key (for the benchmark's report)."""
    return {
        kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel): {
            str(key): str(config) for key, config in tuner.cache.items()
        }
        for kernel, tuner in _tuned.items()
    }


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether these kernels take q [Nq, Hq, D] and k [Nk, Hkv, D] (else use the reference)."""
    head_dim = q.shape[-1]
    return (
        q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype
        and head_dim in (16, 32, 64, 128, 256)
        and q.shape[1] % k.shape[1] == 0
    )


def choose_tile(selected: torch.Tensor, group: int) -> int:
    """Queries per program: several when neighbouring queries share most of their blocks, else 1."""
    tile = min(MAX_TILE, max(1, TILE_ROWS // group))
    if tile == 1 or selected.shape[0] < 2 * tile:
        return 1
    return tile if sharing(selected, tile) < SHARING_LIMIT else 1


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_offsets: torch.Tensor,
    selected: torch.Tensor | Selection,
    scale: float | None = None,
    *,
    tile: int | None = None,
    pack: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-block attention: (out [Nq, Hq, D] in q's dtype, lse [Nq, Hq] float32); differentiable.

    q [Nq, Hq, D]; k, v [Nk, Hkv, D]; block_offsets [Bk + 1] covering the keys (block_offsets[0] = 0,
    block_offsets[-1] = Nk); selected [Nq, Hkv, n] global block indices, -1 empty, repeats count
    once, or a `Selection` of them whose walks earlier calls built (`prepare`). tile: queries per
    program, at most `MAX_TILE` (None: `choose_tile`); pack: share steps between small blocks (None:
    where it saves steps, `block_lists.key_steps`). Gradients flow to q, k, v, through the output and the lse.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    selection = selected if isinstance(selected, Selection) else Selection(selected)
    offsets = block_offsets.to(device=q.device, dtype=torch.long).contiguous()
    tile, steps = prepare(selection, offsets, q.shape[1] // k.shape[1], q.shape[-1], tile, pack)
    return _SelectedAttention.apply(q, k, v, offsets, selection, steps, scale, tile)


def prepare(
    selection: Selection,
    block_offsets: torch.Tensor,
    group: int,
    head_dim: int,
    tile: int | None = None,
    pack: bool | None = None,
) -> tuple[int, KeySteps]:
    """The tile and the forward / dq walk for these lists, built on the first call and kept in `selection`.

    Keyed by the offsets tensor itself (kept alive with the entry, so no other tensor takes its id).
    """

    def build() -> tuple[torch.Tensor, int, KeySteps]:
        lists = _lists(selection)
        chosen = choose_tile(lists, group) if tile is None else tile
        if not 1 <= chosen <= MAX_TILE:
            raise ValueError(f"tile must be 1..{MAX_TILE} queries, got {chosen}")
        return block_offsets, chosen, plan(lists, block_offsets, head_dim, chosen, pack)

    _, chosen, steps = selection.derived(("walk", id(block_offsets), group, head_dim, tile, pack), build)
    return chosen, steps


def _lists(selection: Selection) -> torch.Tensor:
    blocks = selection.blocks
    return blocks if blocks.stride(-1) == 1 else blocks.contiguous()


def _inverted(selection: Selection, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_queries` of the selection over these blocks, built once (the dk/dv walk)."""

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return offsets, *block_queries(_lists(selection), offsets.numel() - 1)

    _, pointers, queries = selection.derived(("queries", id(offsets)), build)
    return pointers, queries


def plan(
    selected: torch.Tensor, block_offsets: torch.Tensor, head_dim: int, tile: int, pack: bool | None = None
) -> KeySteps:
    """The step walk the forward and dq kernels take for these lists."""
    offsets = block_offsets.to(device=selected.device, dtype=torch.long)
    return key_steps(selected, offsets, tile, pack=pack, step=_block_k(head_dim))


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offsets, selection, steps, scale, tile):
        q, k, v = _rows(q), _rows(k), _rows(v)
        out, lse = forward(q, k, v, steps, scale, tile)
        ctx.save_for_backward(q, k, v, out, lse)
        # The lists and walks are no activations: they live in `selection`, shared by every call on it.
        ctx.offsets, ctx.selection, ctx.steps, ctx.scale, ctx.tile = offsets, selection, steps, scale, tile
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(
            q, k, v, out, lse, grad_out, grad_lse, ctx.offsets, ctx.selection, ctx.steps, ctx.scale, ctx.tile
        )
        return dq, dk, dv, None, None, None, None, None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    steps: KeySteps,
    scale: float,
    tile: int,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; `out`/`lse` may be given (tests poison them to prove every element is written)."""
    num_queries, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(num_queries, q_heads, dtype=torch.float32, device=q.device) if lse is None else lse
    if num_queries == 0:
        return out, lse
    _launch(
        _forward_kernel, (-(-num_queries // tile), kv_heads),
        q, k, v, out, lse, *steps.tensors(),
        num_queries, steps.start.shape[1], steps.first.shape[1], kv_heads,
        q.stride(0), k.stride(0), v.stride(0), out.stride(0),
        scale * LOG2E,
        G=group, T=tile, ROWS=_rows_of(group, tile), D=head_dim, BLOCK_K=_block_k(head_dim), WINDOW=steps.window,
        DIRECT=steps.direct,
        PRECISION=_precision(q), UPCAST=_interpreting(),
    )  # fmt: skip
    return out, lse


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    offsets: torch.Tensor,
    selected: torch.Tensor | Selection,
    steps: KeySteps,
    scale: float,
    tile: int,
    *,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (`grads` may be given: tests poison them). The lse's gradient folds into delta."""
    num_queries, q_heads, head_dim = q.shape
    num_keys, kv_heads, _ = k.shape
    group = q_heads // kv_heads
    num_blocks = offsets.numel() - 1
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    grad_out = torch.zeros_like(out) if grad_out is None else _rows(grad_out)
    # delta = rowsum(dO * O) - dlse: dS = P * (dP - delta) then also carries the lse's gradient.
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse2 = torch.where(torch.isfinite(lse), lse * LOG2E, math.inf).contiguous()  # p = 0 for a row without keys
    precision = _precision(q)
    block_k = _block_k(head_dim)
    if num_queries:
        _launch(
            _dq_kernel, (-(-num_queries // tile), kv_heads),
            q, k, v, grad_out, lse2, delta, dq, *steps.tensors(),
            num_queries, steps.start.shape[1], steps.first.shape[1], kv_heads,
            q.stride(0), k.stride(0), v.stride(0), grad_out.stride(0), dq.stride(0),
            scale, scale * LOG2E,
            G=group, T=tile, ROWS=_rows_of(group, tile), D=head_dim, BLOCK_K=block_k, WINDOW=steps.window,
            DIRECT=steps.direct,
            PRECISION=precision, UPCAST=_interpreting(),
        )  # fmt: skip
    if num_blocks and num_keys:
        selection = selected if isinstance(selected, Selection) else Selection(selected)
        pointers, queries = _inverted(selection, offsets)
        rows = _rows_of(group, max(1, TILE_ROWS // group))
        _launch(
            _dkdv_kernel, (num_blocks, kv_heads),
            q, k, v, grad_out, lse2, delta, dk, dv, offsets, pointers, queries,
            num_blocks, kv_heads,
            q.stride(0), k.stride(0), v.stride(0), grad_out.stride(0), dk.stride(0), dv.stride(0),
            scale, scale * LOG2E,
            G=group, D=head_dim, BLOCK_K=block_k, PRECISION=precision, UPCAST=_interpreting(),
            tuned={"QB": rows // group, "ROWS": rows},
        )  # fmt: skip
    return dq, dk, dv


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] with heads and dims packed (rows may be strided, e.g. k and v split from one projection)."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        return x.contiguous()
    return x


def _rows_of(group: int, tile: int) -> int:
    return max(16, triton.next_power_of_2(group * tile))


def _block_k(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def _precision(q: torch.Tensor) -> str:
    """Exact float32 products for float32 inputs (tf32 would be a silent downgrade); half types as they are."""
    return "ieee" if q.dtype == torch.float32 else "tf32"

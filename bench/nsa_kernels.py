"""Benchmark: the Triton selected-attention kernels against dense SDPA, FlexAttention and the reference.

    python bench/nsa_kernels.py [--quick] [--device auto] [--tokens 16384 65536 300000]
                                [--heads 64/4:64 64/4:128 16/1:64 16/1:128] [--out out/bench/nsa_kernels.json]

Self-attention over N tokens, bf16, top-16 blocks per query and KV head. Cases per (heads, N):
- `random`: 16 random blocks of 64 keys per query and KV head (the issue's anchors: fla-core's
  parallel_nsa, 108 TFLOP/s forward at 64/4 heads, D 64, 64K tokens on an H200);
- `routed`: the lists 3D-aware routing (`backend.model.routing.route_to_volume`) gives the voxel
  tokens of a sphere's surface shell in 4^3 blocks (variable-sized, as in stage 2), about N tokens;
  run with the automatic tile choice, with T = 1 forced (what tiling buys) and with 128-row tiles;
- `variable`: random lists over blocks of 33-64 keys versus `random` (full blocks): the cost of
  variable-sized blocks per attended key;
- `small`: random lists over blocks of 8-16 keys (as sparse as routed lists, without the sharing);
- `variable`, `small` and `routed` also run with packing off (`per-block`: every block starts a
  64-key step, v1's walk), and the summary prints each one's time per attended key over `random`'s;
- `tile`: one list of 8 key tiles of 128 per 128-query tile: FlexAttention (compiled) versus our
  kernel given the same lists per query;
- `selection`: score-based routing, top-16 of the N / 64 compressed blocks per query (its time and
  peak memory; TFLOP/s counts the score products only);
- `dense`: `scaled_dot_product_attention` over all N tokens (KV heads expanded), N <= --dense-max.
Forward and forward+backward. TFLOP/s counts only selected work: 4 * Nq * Hq * D * keys per query
forward, 3.5x that forward+backward (dense: all N keys). CUDA events, one warm-up (compiles),
medians over --repeats runs, each on fresh random q, k, v; peak memory above the inputs. A case
that fails is reported and skipped. `lists ms` is the time to build the step walk, included in
`ms`. Prints a table and writes JSON, with the launch configurations autotuning chose. On the CPU (--device cpu) the
kernels run in Triton's interpreter at toy sizes: a smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.device import device_report, pick_device

TOP_N = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="16K tokens, 64/4 and 16/1 at D 64 only")
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--heads", nargs="+", default=None, help="Hq/Hkv:D, e.g. 64/4:64")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["random", "routed", "variable", "small", "tile", "selection", "dense"],
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-max", type=int, default=65536, help="largest N for dense SDPA")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip remaining cases after this long")
    parser.add_argument("--out", type=Path, default=Path("out/bench/nsa_kernels.json"))
    args = parser.parse_args()
    device = pick_device(args.device)
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    cpu = device.type != "cuda"
    tokens = args.tokens or ([96] if cpu else [16384] if args.quick else [16384, 65536, 300000])
    heads = args.heads or (["4/1:16"] if cpu else ["64/4:64", "16/1:64"] if args.quick else None)
    heads = heads or ["64/4:64", "64/4:128", "16/1:64", "16/1:128"]
    repeats = 1 if cpu else args.repeats
    report = {"device": device_report(device), "dtype": "bfloat16", "top_n": TOP_N, "rows": []}
    started = time.perf_counter()
    print(HEADER, flush=True)
    for spec in heads:
        group_spec, head_dim = spec.split(":")
        q_heads, kv_heads = (int(x) for x in group_spec.split("/"))
        for count in tokens:
            for case in args.cases:
                if time.perf_counter() - started > args.budget_s:
                    row = {"case": case, "heads": spec, "tokens": count, "error": "skipped: over --budget-s"}
                    report["rows"].append(row)
                    continue
                shape = Shape(count, q_heads, kv_heads, int(head_dim), device)
                for row in run_case(case, shape, repeats, args.dense_max):
                    report["rows"].append(row)
                    print_row(row)
                write_report(report, args.out, cpu)  # after every case: a run cut short keeps what it measured
    for cost in write_report(report, args.out, cpu)["per_key_vs_full_blocks"]:
        print(
            f"per key vs full blocks: {cost['case']} {cost['variant']} {cost['heads']} N={cost['tokens']} "
            f"{cost['mode']}: {cost['per_key']:.2f}x"
        )
    if not cpu:
        print("autotune:", json.dumps(report["autotune"], indent=1))
    print(f"wall {time.perf_counter() - started:.0f} s; wrote {args.out}")


def write_report(report: dict, path: Path, cpu: bool) -> dict:
    """Add the summaries (per-key costs, autotune choices) to the report and write it as JSON."""
    report["per_key_vs_full_blocks"] = key_costs(report["rows"])
    if not cpu:
        from kernels.nsa import triton_selected

        report["autotune"] = triton_selected.tuned_configs()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


class Shape:
    def __init__(self, tokens: int, q_heads: int, kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.tokens, self.q_heads, self.kv_heads, self.head_dim, self.device = (
            tokens,
            q_heads,
            kv_heads,
            head_dim,
            device,
        )

    @property
    def label(self) -> str:
        return f"{self.q_heads}/{self.kv_heads}:{self.head_dim}"

    def qkv(self, num_queries: int, num_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def randn(n: int, h: int) -> torch.Tensor:
            return torch.randn(n, h, self.head_dim, device=self.device, dtype=torch.bfloat16)

        return randn(num_queries, self.q_heads), randn(num_keys, self.kv_heads), randn(num_keys, self.kv_heads)


def run_case(case: str, shape: Shape, repeats: int, dense_max: int) -> list[dict]:
    """Rows of one case (forward and forward+backward of each variant); a failure becomes an error row."""
    base = {"case": case, "heads": shape.label, "tokens": shape.tokens}
    try:
        if case == "dense":
            if shape.tokens > dense_max:
                return []
            return dense_rows(shape, repeats, base)
        if case == "tile":
            return tile_rows(shape, repeats, base)
        if case == "selection":
            return selection_rows(shape, repeats, base)
        return selected_rows(case, shape, repeats, base)
    except Exception as error:  # report it and go on with the next case
        traceback.print_exc(file=sys.stderr)
        return [{**base, "error": f"{type(error).__name__}: {str(error)[:300]}"}]
    finally:
        if shape.device.type == "cuda":
            torch.cuda.empty_cache()


def selected_rows(case: str, shape: Shape, repeats: int, base: dict) -> list[dict]:
    from kernels.nsa import triton_selected
    from kernels.nsa.block_lists import sharing

    if case == "routed":
        offsets, selected = routed_lists(shape)
    else:
        low, high = {"random": (64, 64), "variable": (33, 64), "small": (8, 16)}[case]
        offsets = block_offsets(shape.tokens, low, high, shape.device)
        selected = random_lists(shape.tokens, shape.kv_heads, offsets.numel() - 1, shape.device)
    num_queries, num_keys = selected.shape[0], int(offsets[-1])
    keys = selected_keys(selected, offsets)
    group = shape.q_heads // shape.kv_heads
    tile = triton_selected.choose_tile(selected, group)
    # (tile, pack) per variant: the automatic choices, and what they are measured against.
    variants = {"auto": (tile, None)}
    if case == "routed":
        variants["T=1"] = (1, None)
        wide = min(triton_selected.MAX_TILE, max(1, 128 // group))  # 128-row tiles: more sharing, wider dots
        if wide != tile:
            variants[f"T={wide}"] = (wide, None)
    if case != "random":
        variants["per-block"] = (tile, False)
    rows = []
    for name, (tile, pack) in variants.items():

        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int = tile, pack: bool | None = pack):
            return triton_selected.selected_attention(q, k, v, offsets, selected, tile=tile, pack=pack)[0]

        def plan(tile: int = tile, pack: bool | None = pack):
            return triton_selected.plan(selected, offsets, shape.head_dim, tile, pack)

        steps = plan()
        extra = {
            "variant": name,
            "tile": tile,
            "packed": steps.packed,
            "queries": num_queries,
            "blocks": offsets.numel() - 1,
            "keys_per_query": keys / (num_queries * shape.kv_heads),
            "steps_per_query": float(steps.steps.sum()) / (num_queries * shape.kv_heads),
            "union_ratio": sharing(selected, max(1, 64 // group)),
            "plan_ms": median_ms(plan, shape.device, repeats),
        }
        flops = 4.0 * shape.head_dim * group * keys
        rows += measure(op, shape, num_queries, num_keys, flops, repeats, {**base, **extra})
    return rows


def tile_rows(shape: Shape, repeats: int, base: dict) -> list[dict]:
    """One list of 8 key tiles of 128 per 128-query tile: FlexAttention versus our kernel on per-query copies."""
    from kernels.nsa import triton_selected
    from kernels.nsa.flex_tiles import tile_attention

    tile_size, count = 128, 8
    num_tokens = shape.tokens // tile_size * tile_size
    key_tiles = num_tokens // tile_size
    if key_tiles == 0:
        return [{**base, "error": f"skipped: under one {tile_size}-token tile"}]
    tile_selected = random_lists(key_tiles, shape.kv_heads, key_tiles, shape.device, count)
    offsets = torch.arange(0, num_tokens + 1, tile_size, device=shape.device)
    per_query = tile_selected.repeat_interleave(tile_size, 0)
    keys = selected_keys(per_query, offsets)
    flops = 4.0 * shape.head_dim * (shape.q_heads // shape.kv_heads) * keys
    ops = {
        "flex": lambda q, k, v: tile_attention(q, k, v, tile_selected, q_tile=tile_size, kv_tile=tile_size)[0],
        "ours": lambda q, k, v: triton_selected.selected_attention(q, k, v, offsets, per_query)[0],
    }
    rows = []
    for name, op in ops.items():
        extra = {"variant": name, "queries": num_tokens, "keys_per_query": keys / (num_tokens * shape.kv_heads)}
        rows += measure(op, shape, num_tokens, num_tokens, flops, repeats, {**base, **extra})
    return rows


def selection_rows(shape: Shape, repeats: int, base: dict) -> list[dict]:
    """Score-based routing (`routing.score_routing`): top-16 of N / 64 compressed blocks per query and KV head."""
    from backend.model.routing import score_routing

    num_blocks = max(TOP_N, shape.tokens // 64)
    q, k_cmp, _ = shape.qkv(shape.tokens, num_blocks)
    query_cu = torch.tensor([0, shape.tokens], device=shape.device)
    block_cu = torch.tensor([0, num_blocks], device=shape.device)
    synchronise(shape.device)
    if shape.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    ms = median_ms(lambda: score_routing(q, k_cmp, query_cu, block_cu, TOP_N), shape.device, repeats)
    peak = torch.cuda.max_memory_allocated() - held if shape.device.type == "cuda" else 0
    flops = 2.0 * shape.tokens * shape.q_heads * shape.head_dim * num_blocks  # the scores alone
    row = {**base, "variant": "score", "mode": "fwd", "queries": shape.tokens, "keys_per_query": num_blocks}
    return [{**row, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_gib": peak / 2**30}]


def dense_rows(shape: Shape, repeats: int, base: dict) -> list[dict]:
    group = shape.q_heads // shape.kv_heads

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        expand = [x.repeat_interleave(group, dim=1).transpose(0, 1)[None] for x in (k, v)]
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], *expand)

    flops = 4.0 * shape.head_dim * shape.q_heads * shape.tokens * shape.tokens
    extra = {"variant": "sdpa", "queries": shape.tokens, "keys_per_query": shape.tokens}
    return measure(op, shape, shape.tokens, shape.tokens, flops, repeats, {**base, **extra})


def measure(
    op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Shape,
    num_queries: int,
    num_keys: int,
    flops: float,
    repeats: int,
    row: dict,
) -> list[dict]:
    """Forward and forward+backward rows: median ms, TFLOP/s and peak memory over fresh inputs."""
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        backward = mode == "fwd+bwd"

        def run(inputs: tuple[torch.Tensor, ...], backward: bool = backward) -> None:
            if not backward:
                with torch.no_grad():
                    op(*inputs)
                return
            out = op(*inputs)
            out.backward(torch.ones_like(out))

        times, peak = [], 0
        for attempt in range(repeats + 1):  # the first run warms up (compiles, tunes)
            inputs = tuple(x.requires_grad_(backward) for x in shape.qkv(num_queries, num_keys))
            synchronise(shape.device)
            if shape.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
            seconds = timed(lambda inputs=inputs: run(inputs), shape.device)
            if attempt:
                times.append(seconds)
            if shape.device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated() - held)
            del inputs
        ms = 1e3 * statistics.median(times)
        work = flops * (3.5 if backward else 1.0)
        rows.append({**row, "mode": mode, "ms": ms, "tflops": work / (ms * 1e-3) / 1e12, "peak_gib": peak / 2**30})
    return rows


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median time of fn (after one warm-up run) in ms."""
    fn()
    return 1e3 * statistics.median(timed(fn, device) for _ in range(max(repeats, 1)))


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_offsets(tokens: int, low: int, high: int, device: torch.device) -> torch.Tensor:
    """Blocks of low..high keys (uniform) covering `tokens` keys; [Bk + 1]."""
    sizes = torch.randint(low, high + 1, (tokens // low + 1,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    offsets = offsets[offsets < tokens]
    return torch.cat([offsets, torch.tensor([tokens])]).to(device)


def random_lists(queries: int, kv_heads: int, blocks: int, device: torch.device, count: int = TOP_N) -> torch.Tensor:
    """[queries, Hkv, count] random blocks, distinct per list (all blocks when there are fewer)."""
    count = min(count, blocks)
    # Random keys per block, top-count of them: distinct without a [queries, blocks] matrix per call.
    lists = []
    for start in range(0, queries, 4096):
        rows = min(4096, queries - start)
        lists.append(torch.rand(rows, kv_heads, blocks, device=device).topk(count, dim=-1).indices)
    return torch.cat(lists)


def routed_lists(shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """3D-aware routing of a sphere shell's voxel tokens (about shape.tokens of them) to its 4^3 blocks."""
    from backend.model.blocks import partition
    from backend.model.routing import per_kv_head, route_to_volume

    device = shape.device
    resolution = max(8, round(math.sqrt(shape.tokens / 4.0)))  # a 2-voxel shell holds about 4 res^2 voxels
    axis = torch.arange(resolution, device=device)
    voxels = torch.cartesian_prod(axis, axis, axis)
    centres = (voxels.float() + 0.5) / resolution * 2 - 1
    keep = ((centres.norm(dim=-1) - 0.8).abs() < 1.0 / resolution).nonzero()[:, 0]
    voxels = voxels[keep]
    blocks = partition(voxels, (4, 4, 4))
    points = (blocks.sort(voxels).float() + 0.5) / resolution * 2 - 1
    chosen = route_to_volume(points, blocks.centres(points), blocks.token_cu, blocks.block_cu, TOP_N)
    return blocks.block_offsets, per_kv_head(chosen, shape.kv_heads)


def selected_keys(selected: torch.Tensor, offsets: torch.Tensor) -> int:
    """Attended (query, KV head, key) triples: distinct selected blocks' sizes summed."""
    from kernels.nsa.block_lists import tile_lists

    lists, counts = tile_lists(selected, 1)
    sizes = (offsets[1:] - offsets[:-1]).to(torch.int64)
    valid = torch.arange(lists.shape[-1], device=lists.device) < counts[..., None]
    return int(torch.where(valid, sizes[lists.clamp_max(sizes.numel() - 1).long()], 0).sum())


HEADER = (
    f"{'case':<9}{'variant':<10}{'heads':<10}{'N':>8}{'mode':>8}{'T':>4}{'pack':>5}{'keys/q':>8}{'steps/q':>8}"
    f"{'union':>7}{'lists ms':>9}{'ms':>10}{'TFLOP/s':>9}{'peak GiB':>9}"
)


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['case']:<9}{'':<10}{row['heads']:<10}{row['tokens']:>8}  {row['error'][:90]}", flush=True)
        return
    union = f"{row['union_ratio']:.2f}" if "union_ratio" in row else ""
    packed = {True: "yes", False: "no"}.get(row.get("packed"), "")
    steps = f"{row['steps_per_query']:.1f}" if "steps_per_query" in row else ""
    plan = f"{row['plan_ms']:.2f}" if "plan_ms" in row else ""
    print(
        f"{row['case']:<9}{row['variant']:<10}{row['heads']:<10}{row['queries']:>8}{row['mode']:>8}"
        f"{row.get('tile', ''):>4}{packed:>5}{row['keys_per_query']:>8.0f}{steps:>8}{union:>7}{plan:>9}"
        f"{row['ms']:>10.3f}{row['tflops']:>9.1f}{row['peak_gib']:>9.2f}",
        flush=True,
    )


def key_costs(rows: list[dict]) -> list[dict]:
    """Time per attended key of each automatic variant against full 64-key blocks (`random`) of the same shape."""
    full = {
        (r["heads"], r["tokens"], r["mode"]): r["ms"] / r["keys_per_query"]
        for r in rows
        if r.get("case") == "random" and "ms" in r
    }
    costs = []
    for r in rows:
        reference = full.get((r["heads"], r["tokens"], r.get("mode")))
        if r.get("case") in ("variable", "small", "routed") and "ms" in r and reference:
            ratio = r["ms"] / r["keys_per_query"] / reference
            costs.append({k: r[k] for k in ("case", "variant", "heads", "tokens", "mode")} | {"per_key": ratio})
    return costs


if __name__ == "__main__":
    main()

"""Benchmark: the PyTorch reference NSA branch operations versus dense SDPA over the same tokens.

    python bench/nsa_reference.py [--device auto] [--dtype bfloat16] [--sizes 16384:64,65536:64] [--out FILE.json]

Self-attention over N tokens of one object in blocks of up to b tokens (sizes drawn in [b/2, b],
like spatial blocks after pruning), 16 query heads over 1 KV head of dim 64, n = 16 random
distinct blocks per query. Times block pooling, score routing, the compressed, selected and window
branches, and dense `scaled_dot_product_attention` over all N tokens (KV heads expanded to the
query heads). TFLOP/s counts only the attended (query, key) pairs: 4 * pairs * Hq * D. Prints a
table and writes JSON; a size that runs out of memory is reported and skipped. These are the
reference-path numbers the kernel issue must beat.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.device import device_report, pick_device
from backend.model.routing import score_routing
from kernels.nsa import block_pool, compressed_attention, selected_attention, window_attention

GPU_SIZES = "16384:64,65536:64,262144:128,409600:512"
CPU_SIZES = "2048:64,4096:64"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(error).lower()


def timed(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float) -> tuple[float, int | None]:
    """Median milliseconds of fn after one warm-up, and the peak memory it allocated (CUDA only)."""
    fn()
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start_all < budget_s):
        start = time.perf_counter()
        fn()
        synchronise(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return 1e3 * sorted(times)[len(times) // 2], peak


def random_blocks(count: int, block: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """block_offsets [Bk + 1] of blocks holding between block/2 and block tokens, covering `count` tokens."""
    sizes = torch.randint(max(block // 2, 1), block + 1, (count // max(block // 2, 1) + 1,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    offsets = offsets[offsets < count]
    return torch.cat([offsets, torch.tensor([count])]).to(device)


def random_selection(queries: int, blocks: int, top_n: int, device: torch.device) -> torch.Tensor:
    """[Nq, 1, n] distinct random blocks per query (all blocks when there are fewer than n)."""
    lists = []
    for start in range(0, queries, 16384):
        scores = torch.rand(min(16384, queries - start), blocks, device=device)
        lists.append(scores.topk(min(top_n, blocks), dim=-1).indices)
    return torch.cat(lists)[:, None, :]


def bench_size(
    args: argparse.Namespace, device: torch.device, device_name: str, tokens: int, block: int, dense_done: set
) -> list[dict]:
    generator = torch.Generator().manual_seed(tokens + block)
    dtype = getattr(torch, args.dtype)
    heads, kv_heads, dim, top_n = args.heads, args.kv_heads, args.head_dim, args.top_n
    block_offsets = random_blocks(tokens, block, device, generator)
    num_blocks = block_offsets.numel() - 1
    lengths = block_offsets[1:] - block_offsets[:-1]
    token_block = torch.repeat_interleave(torch.arange(num_blocks, device=device), lengths)
    cu = torch.tensor([0, tokens], device=device)
    block_cu = torch.tensor([0, num_blocks], device=device)
    q = torch.randn(tokens, heads, dim, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, dim, device=device, dtype=dtype)
    v = torch.randn(tokens, kv_heads, dim, device=device, dtype=dtype)
    k_cmp, v_cmp = block_pool(k, block_offsets), block_pool(v, block_offsets)
    selected = random_selection(tokens, num_blocks, top_n, device).expand(-1, kv_heads, -1)

    pairs = {
        "block_pool": None,
        "score_routing": tokens * num_blocks,
        "compressed": tokens * num_blocks,
        "selected": int(lengths[selected[:, 0]].sum()),
        "window": int((lengths.double() ** 2).sum()),
        "dense_sdpa": tokens * tokens,
    }
    group = heads // kv_heads

    def dense() -> torch.Tensor:
        # [1, Hq, N, D]; KV heads expanded to the query heads so any SDPA backend applies.
        qd = q.transpose(0, 1)[None]
        kd = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        vd = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        return F.scaled_dot_product_attention(qd, kd, vd)

    ops: dict[str, Callable[[], object]] = {
        "block_pool": lambda: block_pool(k, block_offsets),
        "score_routing": lambda: score_routing(q, k_cmp, cu, block_cu, top_n),
        "compressed": lambda: compressed_attention(q, k_cmp, v_cmp, cu, block_cu),
        "selected": lambda: selected_attention(q, k, v, block_offsets, selected),
        "window": lambda: window_attention(q, k, v, block_offsets, token_block),
        "dense_sdpa": dense,
    }
    rows = []
    for name, fn in ops.items():
        if name == "dense_sdpa" and tokens in dense_done:
            continue  # dense attention does not depend on the block size
        row = {
            "op": name,
            "device": device_name,
            "tokens": tokens,
            "block_max": block,
            "blocks": num_blocks,
            "top_n": top_n,
            "head_dim": dim,
            "heads": heads,
            "kv_heads": kv_heads,
            "dtype": args.dtype,
            "pairs": pairs[name],
        }
        try:
            with torch.no_grad():
                ms, peak = timed(fn, device, args.repeats, args.op_seconds)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            row.update(ms=None, tflops=None, peak_bytes=None, skipped="out of memory")
        else:
            flops = None if pairs[name] is None else 4.0 * pairs[name] * heads * dim
            row.update(ms=ms, tflops=None if flops is None else flops / (ms * 1e-3) / 1e12, peak_bytes=peak)
            if name == "dense_sdpa":
                dense_done.add(tokens)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print_row(row)
    return rows


HEADER = f"{'device':<12}{'op':<14}{'N':>8}{'b':>5}{'blocks':>8}{'n':>4}{'D':>4}{'Hq/Hkv':>8}{'dtype':>10}"
HEADER += f"{'ms':>11}{'TFLOP/s':>9}{'peak GiB':>10}"


def print_row(row: dict) -> None:
    ms = "OOM" if row["ms"] is None else f"{row['ms']:.2f}"
    tflops = "" if row.get("tflops") is None else f"{row['tflops']:.3g}"
    peak = "" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**30:.2f}"
    heads = f"{row['heads']}/{row['kv_heads']}"
    print(
        f"{row['device'][:11]:<12}{row['op']:<14}{row['tokens']:>8}{row['block_max']:>5}{row['blocks']:>8}"
        f"{row['top_n']:>4}{row['head_dim']:>4}{heads:>8}{row['dtype']:>10}{ms:>11}{tflops:>9}{peak:>10}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", default=None, help=f"N:b,... (default {GPU_SIZES} on CUDA, {CPU_SIZES} else)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--top-n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--op-seconds", type=float, default=4.0, help="stop repeating an op after this long")
    parser.add_argument("--out", type=Path, default=Path("out/bench/nsa_reference.json"))
    args = parser.parse_args()

    device = pick_device(args.device)
    report = device_report(device)
    device_name = report["gpu"] or "cpu"
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    sizes = args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    print(HEADER)
    rows, dense_done = [], set()
    for item in sizes.split(","):
        tokens, block = (int(part) for part in item.split(":"))
        try:
            rows += bench_size(args, device, device_name, tokens, block, dense_done)
        except (RuntimeError, MemoryError) as error:  # the inputs of this size do not fit
            if not is_out_of_memory(error):
                raise
            rows.append({"op": "setup", "tokens": tokens, "block_max": block, "skipped": "out of memory"})
            print(f"N={tokens} b={block}: out of memory while building the inputs, skipped", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {**report, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

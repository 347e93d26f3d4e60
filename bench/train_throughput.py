"""Benchmark: training throughput (samples/s, tokens/s) of `python -m backend train`, on one GPU or under torchrun.

    python bench/train_throughput.py [--model small] [--batch 4] [--out out/bench/train_1gpu.json]
    torchrun --nproc_per_node 4 bench/train_throughput.py --out out/bench/train_4gpu.json
    python bench/train_throughput.py --summarise out/bench/train_*gpu.json   # scaling table
    python bench/train_throughput.py --prefetch 3 --out out/bench/train_1gpu_prefetch.json  # background renderer
    torchrun --nproc_per_node 4 bench/train_throughput.py --stage 2 --sequence-parallel 4 --batch 1 \
        --out out/bench/train_stage2_sp4.json   # stage 2, one object's sparse sequence split over 4 GPUs

Runs the real training loop (synthetic data, the scene pool's re-rendering included) into a
temporary folder: `--warm` steps are not counted, the next `--steps` are. Samples and tokens are
summed over all ranks; `data_fraction` is the share of each step spent waiting for scenes (rendering
them inline, or for the producer process with `--prefetch N`). The summary gives each run's scaling
efficiency against the one-GPU run: (samples/s on N GPUs) / (N x samples/s on one).

`--stage 2` trains the sparse stage from the fresh model's weights, its tokens picked by the objects' known
geometry (`--guide truth`: an untrained stage 1 finds no surface); `--sequence-parallel N` splits each object's
sparse sequence over groups of N ranks (samples of a group count once, so the efficiency compares like with like).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs as a plain script (and under torchrun) from a checkout

from backend.device import device_report  # noqa: E402
from backend.model.checkpoint import save_checkpoint  # noqa: E402
from backend.model.config import CONFIGS  # noqa: E402
from backend.model.lsrm import LSRM  # noqa: E402
from backend.train import LOG, TrainConfig, train  # noqa: E402

COLUMNS = (
    "ranks",
    "stage",
    "sequence_parallel",
    "batch",
    "inputs",
    "resolution",
    "prefetch",
    "samples_per_s",
    "tokens_per_s",
    "data_fraction",
    "efficiency",
)


def measure(args: argparse.Namespace) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as folder:
        init = None
        if args.stage == 2:  # every rank writes the same fresh weights (seeded) to its own folder
            torch.manual_seed(0)
            init = Path(folder) / "stage1.safetensors"
            save_checkpoint(LSRM(CONFIGS[args.model]), init)
        config = TrainConfig(
            out=Path(folder) / "run",
            model=args.model,
            stage=args.stage,
            init=init,
            guide="truth",
            sequence_parallel=args.sequence_parallel,
            steps=args.warm + args.steps,
            batch=args.batch,
            inputs=(args.inputs, args.inputs),
            resolution=args.resolution,
            pool=args.pool,
            prefetch=args.prefetch,
            log_every=args.warm,
            eval_every=0,  # no evaluation renders: they are not training
            checkpoint_every=10**9,
            gradient_checkpointing=args.gradient_checkpointing,
            device=args.device,
        )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
        train(config, progress=lambda stage, fraction: None)
        log = Path(folder) / "run" / LOG
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    measured = [r for r in records if "samples_per_s" in r and r["step"] > args.warm]
    if not measured:
        return {}
    mean = {key: sum(r[key] for r in measured) / len(measured) for key in ("samples_per_s", "tokens_per_s")}
    return {
        "model": args.model,
        "ranks": measured[-1]["ranks"],
        "batch": args.batch,
        "inputs": args.inputs,
        "resolution": args.resolution or "model",
        "prefetch": args.prefetch,
        "stage": args.stage,
        "sequence_parallel": args.sequence_parallel,
        "dtype": "bfloat16 autocast" if device is not None else "float32",
        "samples_per_s": round(mean["samples_per_s"], 3),
        "tokens_per_s": round(mean["tokens_per_s"], 1),
        "data_fraction": measured[-1]["data_fraction"],
        "peak_memory_gib": measured[-1].get("peak_memory_gib"),
        "sequence_share": measured[-1].get("sequence_share"),  # the main rank's share of stage-2 tokens
        "steps_measured": args.steps,
        "device": device_report(device or torch.device("cpu")),
    }


def summarise(paths: list[Path]) -> list[dict]:
    rows = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["ranks"])
    single = next((r["samples_per_s"] for r in rows if r["ranks"] == 1), None)
    for row in rows:
        row["efficiency"] = round(row["samples_per_s"] / (row["ranks"] * single), 3) if single else None
    return rows


def print_table(rows: list[dict]) -> None:
    print(" ".join(f"{c:>14}" for c in COLUMNS))
    for row in rows:
        print(" ".join(f"{row.get(c)!s:>14}" for c in COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=4, help="objects per GPU and step")
    parser.add_argument("--inputs", type=int, default=12, help="input views per object")
    parser.add_argument("--resolution", type=int, default=0, help="view size (0: the model's image size)")
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=0, help="scenes a producer process renders ahead (0: inline)")
    parser.add_argument("--warm", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="2: the sparse stage (known geometry)")
    parser.add_argument("--sequence-parallel", type=int, default=1, help="stage 2: ranks per group sharing a batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("out/bench/train_throughput.json"))
    parser.add_argument("--summarise", type=Path, nargs="+", default=None, help="JSON files of runs to compare")
    args = parser.parse_args()
    if args.summarise:
        rows = summarise(args.summarise)
        print_table(rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": rows}, indent=2))
        return
    result = measure(args)
    if int(os.environ.get("RANK", "0")) == 0 and result:
        print_table([result])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

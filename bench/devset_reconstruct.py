"""Benchmark: reconstruct the prepared development set with each preset (evaluate's GPU phase).

    python bench/devset_reconstruct.py DIR --out RUN [--presets fast standard high] [--assets NAME ...]
                                       [--engine refine|feedforward|both] [--checkpoint MODEL.safetensors]
                                       [--device auto] [--deadline-s SECONDS]

DIR is what `python -m backend evaluate ASSET... --out DIR --phase inputs` prepared (only DIR/inputs.json and
DIR/<name>/bundle/ are read). Per preset and asset, backend.evaluate.reconstruct_prepared writes
RUN/<preset>/<name>.glb and RUN/<preset>/<name>.json: wall time, stage times, peak GPU memory, training PSNR,
or the error when it failed. A failing asset does not stop the others; runs not started before --deadline-s
are recorded as skipped; runs that RUN already holds (GLB + record without error, made with the same preset
settings, engine and checkpoint) are kept, so calling it again resumes. Needs no Blender. Prints a line per
run and a table, writes RUN/<preset>/summary.json. Score each preset afterwards (with Blender):
    python -m backend evaluate --phase score --out DIR --reconstructions RUN/<preset>
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

import torch  # noqa: E402

from backend.atomic import atomic_file  # noqa: E402
from backend.device import device_report, pick_device  # noqa: E402
from backend.errors import run_script  # noqa: E402
from backend.evaluate import (  # noqa: E402
    INPUTS_INDEX,
    EvaluateConfig,
    load_reconstructions,
    reconstruct_prepared,
    reconstruction_settings,
)
from backend.presets import PRESETS, variant  # noqa: E402
from backend.reconstruct import ENGINES  # noqa: E402


def write_json(path: Path, value: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2), encoding="utf-8")


def run_one(prepared: Path, name: str, out: Path, config: EvaluateConfig) -> dict:
    """Reconstruct one asset with one preset; the record (or the error) is also written to out/<name>.json."""
    try:
        record = reconstruct_prepared(prepared / name, out / f"{name}.glb", config)
    except Exception as error:  # any failure (bad input, out of memory) is this asset's alone
        traceback.print_exc()
        record = {"preset": config.preset, "error": f"{type(error).__name__}: {error}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_json(out / f"{name}.json", record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared", type=Path, metavar="DIR", help="the inputs phase's --out folder")
    parser.add_argument("--out", type=Path, required=True, help="run folder: RUN/<preset>/<name>.glb + .json")
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=["fast", "standard", "high"])
    parser.add_argument("--assets", nargs="+", default=None, help="names to run (default: all in DIR/inputs.json)")
    parser.add_argument("--engine", choices=ENGINES, default=None, help="default: the preset's (see reconstruct)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="LSRM weights for the feed-forward engine")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="RefineConfig overrides: runs PRESET+"
    )
    args = parser.parse_args()
    args.presets = [variant(preset, args.set).name for preset in args.presets]
    index = json.loads((args.prepared / INPUTS_INDEX).read_text(encoding="utf-8"))
    names = args.assets or index["assets"]
    unknown = sorted(set(names) - set(index["assets"]))
    if unknown:
        raise SystemExit(f"{', '.join(unknown)} not prepared in {args.prepared}; there are {index['assets']}")
    device = pick_device(args.device)
    begin = time.perf_counter()

    rows = []
    runs = [(preset, name) for preset in args.presets for name in names]
    for number, (preset, name) in enumerate(runs, start=1):
        out = args.out / preset
        out.mkdir(parents=True, exist_ok=True)
        elapsed = time.perf_counter() - begin
        config = EvaluateConfig(preset=preset, engine=args.engine, checkpoint=args.checkpoint, device=str(device))
        earlier = load_reconstructions(out, [name])[name]  # a GLB an earlier call made is kept: calls resume
        if "error" not in earlier and earlier.get("settings") == reconstruction_settings(config):
            record = earlier
        elif args.deadline_s is not None and elapsed > args.deadline_s:
            record = {"preset": preset, "error": f"skipped: the {args.deadline_s:.0f} s deadline had passed"}
            write_json(out / f"{name}.json", record)
        else:
            if "error" not in earlier:
                print(f"{out / name}.glb was made with other settings: reconstructing it again", flush=True)
            print(f"[{number}/{len(runs)} {elapsed:6.0f} s] {preset} {name} ...", flush=True)
            record = run_one(args.prepared, name, out, config)
        rows.append({"preset": preset, "asset": name, **record})
        print(f"[{number}/{len(runs)}] {preset} {name}: {summary_line(record)}", flush=True)

    for preset in args.presets:  # per preset folder, from the records there: processes may share a preset
        folder = args.out / preset
        own = [{"asset": name, **record} for name, record in load_reconstructions(folder, index["assets"]).items()]
        report = {**device_report(device), "dtype": "float32", "inputs": index["settings"], "rows": own}
        write_json(folder / "summary.json", report)
    print(f"\n{'preset':<10}{'asset':<20}{'engine':<12}{'s/object':>10}{'peak GiB':>10}{'train dB':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['preset']:<10}{row['asset'][:19]:<20}{row['error'][:60]}")
            continue
        psnr = "-" if row["training_psnr"] is None else f"{row['training_psnr']:.2f}"
        print(
            f"{row['preset']:<10}{row['asset'][:19]:<20}{row['engine']:<12}{row['seconds']:>10.1f}"
            f"{_gib(row['peak_gpu_memory_bytes']):>10}{psnr:>10}"
        )
    where = " ".join(str(args.out / preset / "summary.json") for preset in args.presets)
    print(f"({report.get('gpu') or 'cpu'}, {time.perf_counter() - begin:.0f} s) -> {where}")


def summary_line(record: dict) -> str:
    if "error" in record:
        return record["error"]
    stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in record["timings"].items())
    return f"{record['seconds']:.1f} s, peak {_gib(record['peak_gpu_memory_bytes'])} GiB ({stages})"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


if __name__ == "__main__":
    run_script(main)

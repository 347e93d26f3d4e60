"""Benchmark: how much of a scored reconstruction's relit error comes from pixels its mesh does not cover.

    python bench/relit_coverage.py DIR RUN [NAME ...]

DIR is the prepared folder (DIR/<name>/test/gt/*.exr), RUN the folder `evaluate --phase score
--reconstructions RUN` rendered into (RUN/<name>/test/ours/*.exr). Per asset, over its test views: the
ground truth's mask pixels our render leaves empty (missed) and our pixels outside that mask (extra), the
median distance in pixels from a missed pixel to our silhouette, the share of PSNR-L's squared error on
missed pixels, and PSNR-L on the pixels both cover. Prints a table and writes RUN/coverage.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.ndimage import distance_transform_edt  # noqa: E402

from backend.exr import read_exr_rgba  # noqa: E402
from backend.metrics import tone_map  # noqa: E402


def coverage(truth_folder: Path, ours_folder: Path) -> dict:
    sums = {"mask": 0, "missed": 0, "extra": 0, "error": 0.0, "missed error": 0.0}
    depths = []
    for path in sorted(truth_folder.glob("*.exr")):
        truth, ours = read_exr_rgba(path, "the ground truth"), read_exr_rgba(ours_folder / path.name, "our render")
        mask, covered = truth[..., 3] >= 0.5, ours[..., 3] >= 0.5
        missed = mask & ~covered
        error = ((tone_map(torch.from_numpy(truth[..., :3])) - tone_map(torch.from_numpy(ours[..., :3]))) ** 2).numpy()
        error = error.mean(-1)
        sums["mask"] += int(mask.sum())
        sums["missed"] += int(missed.sum())
        sums["extra"] += int((covered & ~mask).sum())
        sums["error"] += float(error[mask].sum())
        sums["missed error"] += float(error[missed].sum())
        depths.append(distance_transform_edt(~covered)[missed])
    both = sums["mask"] - sums["missed"]
    return {
        "missed": sums["missed"] / sums["mask"],
        "extra": sums["extra"] / sums["mask"],
        "median_missed_depth_px": float(np.median(np.concatenate(depths))) if sums["missed"] else 0.0,
        "missed_share_of_error": sums["missed error"] / max(sums["error"], 1e-12),
        "psnr_l": -10.0 * math.log10(sums["error"] / sums["mask"]),
        "psnr_l_covered": -10.0 * math.log10(max(sums["error"] - sums["missed error"], 1e-12) / max(both, 1)),
    }


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    prepared, run = Path(sys.argv[1]), Path(sys.argv[2])
    names = sys.argv[3:] or json.loads((prepared / "inputs.json").read_text(encoding="utf-8"))["assets"]
    rows = {name: coverage(prepared / name / "test" / "gt", run / name / "test" / "ours") for name in names}
    print(f"{'asset':<20}{'missed':>8}{'extra':>8}{'depth px':>10}{'err share':>11}{'PSNR-L':>8}{'covered':>9}")
    for name, row in rows.items():
        print(
            f"{name:<20}{row['missed']:>8.3f}{row['extra']:>8.3f}{row['median_missed_depth_px']:>10.1f}"
            f"{row['missed_share_of_error']:>11.2f}{row['psnr_l']:>8.2f}{row['psnr_l_covered']:>9.2f}"
        )
    (run / "coverage.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

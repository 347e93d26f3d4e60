"""Benchmark of the HTTP service's own overhead around one job: what a client waits for beyond the work.

Starts the real service (`tests/service_helpers.py`: `python -m backend serve` plus the `micro`
preset, so each job's reconstruction takes seconds; the reconstruction is not what is measured)
and sends a 16-view 512 x 512 bundle (the committed demo views, upsampled) several times:

    upload           POST /v1/jobs round trip: upload, unzip, validate every image, queue
    submit->running  from the client starting the POST to the server's `started_at` of the job
    ready->received  from the server's `finished_at` to the client holding the whole GLB, polling
                     the status every --poll seconds (half of that is the expected polling delay)
    download         GET /v1/jobs/{id}/result alone

Client and server share the machine, hence one clock. A benchmark, not a test: nothing here fails
on a time. Prints a table and writes JSON.

    .venv/bin/python bench/service_overhead.py --runs 5 --out out/bench/service_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.service_helpers import small_bundle, start_service, submit, zip_folder  # noqa: E402

MEASURES = ("upload", "submit->running", "ready->received", "download")


def one_job(client, archive: bytes, texture_size: int, poll: float) -> dict:
    begin = time.time()
    response = submit(client, archive, name="barrel.zip", preset="micro", texture_size=texture_size)
    posted = time.time()
    response.raise_for_status()
    job_id = response.json()["id"]
    while (status := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        time.sleep(poll)
    if status["state"] != "done":
        raise RuntimeError(f"job {job_id} {status['state']}: {status['message']}")
    asked = time.time()
    glb = client.get(status["result"])
    received = time.time()
    glb.raise_for_status()
    client.delete(f"/v1/jobs/{job_id}")
    return {
        "upload": posted - begin,
        "submit->running": status["started_at"] - begin,
        "ready->received": received - status["finished_at"],
        "download": received - asked,
        "job": status["finished_at"] - status["started_at"],
        "upload checks (server)": status["timings"]["upload checks"],
        "glb_bytes": len(glb.content),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--texture-size", type=int, default=1024, help="texture size of the GLB (sets its size)")
    parser.add_argument("--poll", type=float, default=0.05, help="status polling interval of the client (s)")
    parser.add_argument("--out", type=Path, default=Path("out/bench/service_overhead.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle = small_bundle(scratch / "barrel", views=args.views, size=args.res)
        archive = zip_folder(bundle, top="barrel")
        service = start_service(scratch / "service", "--preview-size", "128")
        try:
            with service.client(timeout=300) as client:
                one_job(client, archive, args.texture_size, args.poll)  # warm-up: first-use costs of the worker
                runs = [one_job(client, archive, args.texture_size, args.poll) for _ in range(args.runs)]
        finally:
            service.stop()

    summary = {
        key: {
            "median": statistics.median(r[key] for r in runs),
            "min": min(r[key] for r in runs),
            "max": max(r[key] for r in runs),
        }
        for key in (*MEASURES, "upload checks (server)", "job")
    }
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
        },
        "bundle": {"views": args.views, "resolution": args.res, "zip_bytes": len(archive)},
        "glb_bytes": runs[0]["glb_bytes"],
        "poll_s": args.poll,
        "runs": runs,
        "summary_s": summary,
    }
    print(
        f"{args.views} views of {args.res}^2, zip {len(archive) / 2**20:.1f} MiB, "
        f"GLB {runs[0]['glb_bytes'] / 2**20:.2f} MiB, "
        f"{args.runs} runs, polling every {args.poll * 1000:.0f} ms, {os.cpu_count()} CPU cores"
    )
    print(f"{'measure':<24} {'median':>9} {'min':>9} {'max':>9}")
    for key, values in summary.items():
        print(f"{key:<24} {values['median'] * 1000:7.0f}ms {values['min'] * 1000:7.0f}ms {values['max'] * 1000:7.0f}ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

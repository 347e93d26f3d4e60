"""The real service in a child process, for the service tests and the overhead benchmark.

`start_service` runs `python -m backend serve --port 0 ...` (or, with `micro=True`, this module,
which is exactly that command with one more preset registered first: `micro`, a reconstruction
cut down to seconds on a CPU, so that tests of the service's plumbing do not wait minutes for
quality nobody checks). It reads the one JSON start line, and gives a client with the token.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import OpenEXR
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120.0  # importing torch on a loaded 2-core machine takes a while


def micro_preset():
    """The cheapest reconstruction that still runs every stage: hull fit, one image step, export, preview."""
    from backend.presets import Preset
    from tests.test_refine import TINY

    refine = dataclasses.replace(TINY, prefit_steps=40, prefit_points=1024, coarse_steps=1, fine_steps=0)
    return Preset("micro", refine, resolution=32, texture_size=64, target_faces=500, budget="tests only")


@dataclass
class Service:
    process: subprocess.Popen
    url: str
    token: str
    token_file: Path
    work_dir: Path
    log: Path

    def client(self, token: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        """SIGTERM (a graceful stop); SIGKILL if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stdout.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def start_service(work_dir: Path, *arguments: str, micro: bool = True) -> Service:
    """Start the service on a free loopback port with its work folder at `work_dir`; wait for its start line."""
    work_dir.mkdir(parents=True, exist_ok=True)
    entry = ["-m", "tests.service_helpers"] if micro else ["-m", "backend", "serve"]
    command = [sys.executable, *entry, "--port", "0", "--work-dir", str(work_dir), "--device", "cpu", *arguments]
    log = work_dir / "stderr.log"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, env=environment)
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT)
        start = json.loads(line)
    except (queue.Empty, json.JSONDecodeError):
        process.kill()
        raise RuntimeError(f"the service did not start: {log.read_text(errors='replace')[-3000:]}") from None
    token_file = Path(start["token_file"])
    assert start["pid"] == process.pid and start["url"].startswith("http://127.0.0.1:")
    return Service(process, start["url"], token_file.read_text().strip(), token_file, work_dir, log)


def small_bundle(out: Path, views: int = 6, size: int = 32, environment: str = "tiny") -> Path:
    """The committed demo bundle (a real object rendered in Blender), cut down to a few small views.

    environment "demo" keeps its lighting (the studio world, 1024 x 512); "tiny" replaces it with a
    16 x 8 grey sky, whose split-sum tables cost next to nothing, for tests of the service's plumbing.
    """
    source = REPO / "demo" / "input"
    meta = json.loads((source / "transforms.json").read_text())
    chosen = np.linspace(0, len(meta["frames"]) - 1, views).round().astype(int)
    (out / "images").mkdir(parents=True)
    frames = []
    for index in chosen:
        frame = dict(meta["frames"][index])
        scale = size / frame["w"]
        with Image.open(source / frame["file_path"]) as image:
            image.resize((size, size), Image.Resampling.BOX).save(out / frame["file_path"])
        frame.update({key: frame[key] * scale for key in ("fl_x", "fl_y", "cx", "cy")}, w=size, h=size)
        frames.append(frame)
    meta["frames"] = frames
    light = meta["environment"]["file_path"]
    if environment == "demo":
        (out / light).write_bytes((source / light).read_bytes())
    else:
        sky = np.full((8, 16, 3), 0.8, np.float32)
        header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
        OpenEXR.File(header, {"RGB": sky}).write(str(out / light))
    (out / "transforms.json").write_text(json.dumps(meta))
    return out


def zip_folder(folder: Path, top: str | None = None) -> bytes:
    """A bundle folder zipped in memory, its files at the top or inside a folder named `top`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                archive.write(path, f"{top}/{name}" if top else name)
    return buffer.getvalue()


def submit(client: httpx.Client, archive: bytes, name: str = "object.zip", **fields) -> httpx.Response:
    data = {key: str(value) for key, value in fields.items()}
    return client.post("/v1/jobs", files={"bundle": (name, archive, "application/zip")}, data=data)


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 300.0) -> dict:
    """Poll a job until its state is one of `states`; returns the status (fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if status["state"] in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {status['state']} after {timeout} s: {status}")
        time.sleep(0.05)


def main(arguments: list[str]) -> int:
    """`python -m backend serve ARGS` with the `micro` preset added."""
    from backend import presets
    from backend.cli import main as cli

    presets.PRESETS["micro"] = micro_preset()
    return cli(["serve", *arguments])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Jobs of the service (DESIGN §7): a store of jobs on disk, a bounded queue, one worker thread.

Each job lives in its own folder under `<work dir>/jobs/<id>/`:

    status.json    what GET /v1/jobs/{id} answers, rewritten atomically on every change of state or stage
    input/         the unpacked bundle; removed as soon as the job ends
    result.glb     the asset, once done
    preview.png    a small render of the result from the first input camera

One worker thread runs one job at a time (one GPU, one job: two would only fight over its memory);
the others wait in a bounded queue. A job's failure, whatever its cause (bad input found late, out of
memory, a bug), ends that job with a message and the worker goes on. A cancelled job stops at the
engine's next step through `should_stop`. When the service starts it finds the jobs of its previous
life on disk: unfinished ones become failed with a message that says why, finished ones stay
fetchable until they expire. Results are removed a while after they are fetched, or at a maximum age.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import logging
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file
from .bundle import Bundle, load_bundle
from .colour import linear_to_srgb
from .errors import InputError
from .feedforward import load_model
from .presets import get_preset
from .progress import StageTimer
from .reconstruct import ReconstructionResult, reconstruct
from .refine import Cancelled
from .render import RenderOptions, render_views
from .shading import Environment, builtin_environment, read_environment_image
from .uploads import UploadLimits

log = logging.getLogger(__name__)

STATUS, RESULT, PREVIEW, INPUT = "status.json", "result.glb", "preview.png", "input"
STOPPED_WHILE_RUNNING = "the service stopped while this job was running; submit it again."
STOPPED_WHILE_QUEUED = "the service stopped before this job could run; submit it again."
# Share of the overall progress bar each reconstruction stage fills. The engine's stages share theirs
# by step count (see `_ProgressBar`); stages not listed (the feed-forward pass, about a second) leave the bar
# where it is.
ENGINE_SHARE, PREVIEW_SHARE = 0.8, 0.02
PREVIEW_LIGHT_HEIGHT = 32  # rows of the preview's environment map (width twice that)
EXPORT_SHARES = {"marching cubes": 0.3, "cleanup + simplify": 0.1, "uv atlas": 0.2, "bake": 0.35, "write": 0.05}


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (State.DONE, State.FAILED, State.CANCELLED)


class QueueFull(Exception):  # noqa: N818 (a condition the server answers with 429, not an error)
    """The queue holds as many jobs as it may; the client should try again later."""


@dataclass(frozen=True)
class JobRequest:
    """What the client asked for; None means the preset's (or the engine's) default."""

    preset: str
    engine: str | None = None
    texture_size: int | None = None
    target_faces: int | None = None


@dataclass
class Job:
    id: str
    folder: Path
    request: JobRequest
    bundle: str  # the bundle folder, relative to `folder`
    state: State = State.QUEUED
    stage: str = "queued"
    progress: float = 0.0  # 0..1 over the whole job
    message: str = "waiting for the GPU"
    created_at: float = field(default_factory=time.time)  # seconds since the epoch
    started_at: float | None = None
    finished_at: float | None = None
    fetched_at: float | None = None  # when the result was first downloaded
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    warnings: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def result(self) -> Path:
        return self.folder / RESULT

    @property
    def preview(self) -> Path:
        return self.folder / PREVIEW

    def status(self) -> dict[str, Any]:
        """The job as JSON: what clients poll and what is kept on disk."""
        done = self.state == State.DONE
        return {
            "id": self.id,
            "state": self.state.value,
            "stage": self.stage,
            "progress": round(self.progress, 4),
            "message": self.message,
            "preset": self.request.preset,
            "engine": self.request.engine,
            "texture_size": self.request.texture_size,
            "target_faces": self.request.target_faces,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "timings": self.timings,
            "warnings": self.warnings,
            "result": f"/v1/jobs/{self.id}/result" if done else None,
            "preview": f"/v1/jobs/{self.id}/preview" if done and self.preview.is_file() else None,
            "bundle": self.bundle,
            "fetched_at": self.fetched_at,
        }

    @staticmethod
    def from_status(folder: Path, data: dict[str, Any]) -> Job:
        request = JobRequest(data["preset"], data.get("engine"), data.get("texture_size"), data.get("target_faces"))
        job = Job(data["id"], folder, request, data["bundle"], State(data["state"]))
        for key in ("stage", "progress", "message", "created_at", "started_at", "finished_at", "fetched_at"):
            setattr(job, key, data.get(key, getattr(job, key)))
        job.timings, job.warnings = dict(data.get("timings") or {}), list(data.get("warnings") or [])
        return job


# A job runner does the work of one job: it writes the job's result files and returns the job's
# (timings, warnings). It gets progress(stage, fraction 0..1 of the whole job) and should_stop().
Runner = Callable[[Job, Callable[[str, float], None], Callable[[], bool]], tuple[dict[str, float], list[str]]]


class JobStore:
    """The service's jobs: in memory for answering, on disk for surviving a restart; runs them one at a time."""

    def __init__(
        self,
        work_dir: Path,
        run: Runner,
        *,
        max_queue: int = 8,
        keep_fetched_s: float = 300.0,
        max_age_s: float = 24 * 3600.0,
    ) -> None:
        self.root = Path(work_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_queue, self.keep_fetched_s, self.max_age_s = max_queue, keep_fetched_s, max_age_s
        self._run = run
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._lock = threading.RLock()
        self._disk = threading.Lock()  # one status write at a time, each from a snapshot taken under it
        self._wakeup = threading.Condition(self._lock)
        self._closing = False
        self._recover()
        self._worker = threading.Thread(target=self._work, name="lsrm-job-worker", daemon=True)
        self._worker.start()
        self._janitor = threading.Thread(target=self._sweep_forever, name="lsrm-job-janitor", daemon=True)
        self._janitor.start()

    # ------------------------------------------------------------------ what the routes call

    def check_room(self) -> None:
        """Raise QueueFull when a new job could not be queued (checked before reading an upload)."""
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"the queue is full ({len(self._queue)} jobs waiting); try again when a job has finished."
                )

    @contextmanager
    def incoming(self) -> Iterator[Path]:
        """A fresh folder for an upload being checked; removed unless `submit` adopted it."""
        folder = self.root / f".incoming-{uuid.uuid4().hex}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def submit(self, incoming: Path, bundle: Path, request: JobRequest, timings: dict[str, float]) -> Job:
        """Adopt a checked upload folder as a new queued job; `bundle` is the bundle folder inside it."""
        job_id = uuid.uuid4().hex
        job = Job(job_id, self.root / job_id, request, bundle.relative_to(incoming).as_posix(), timings=timings)
        _write_json(incoming / STATUS, job.status())  # nobody else sees the job yet: no lock needed
        with self._lock:
            self.check_room()
            incoming.rename(job.folder)
            self._jobs[job_id] = job
            self._queue.append(job)
            job.message = self._queue_message(len(self._queue) - 1)
            self._wakeup.notify_all()
        log.info("job %s queued (%s)", job_id, request)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            status = job.status()
            if job.state == State.QUEUED:
                status["queue_position"] = self._queue.index(job)
            return status

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel an unfinished job (a running one stops at the engine's next step); forget a finished one.

        Returns the job's status after the call, or None if there is no such job.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state == State.QUEUED:
                self._queue.remove(job)
                self._finish(job, State.CANCELLED, "cancelled before it started.")
            elif job.state == State.RUNNING:
                job.cancel.set()
                job.message = "cancelling: the engine stops at its next step."
            else:
                del self._jobs[job_id]
                shutil.rmtree(job.folder, ignore_errors=True)
                log.info("job %s deleted with its files", job_id)
            status = job.status()
        if job.state == State.CANCELLED and job.id in self._jobs:
            self._persist(job)
        return status

    def mark_fetched(self, job_id: str) -> None:
        """The result has been downloaded: its files may go once the grace period has passed."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.fetched_at is None:
                job.fetched_at = time.time()
        if job is not None:
            self._persist(job)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"queue_length": len(self._queue), "running": self._running.id if self._running else None}

    def close(self, timeout: float = 30.0) -> None:
        """Stop: the running job is cancelled (and recorded as stopped), queued ones stay queued on disk."""
        with self._lock:
            self._closing = True
            if self._running is not None:
                self._running.cancel.set()
            self._wakeup.notify_all()
        self._worker.join(timeout)
        self._janitor.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wakeup.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                self._running = job
                job.state, job.stage, job.message = State.RUNNING, "starting", "running"
                job.started_at = time.time()
                job.timings["queued"] = job.started_at - job.created_at
                for position, waiting in enumerate(self._queue):
                    waiting.message = self._queue_message(position)
            self._persist(job)
            log.info("job %s started", job.id)
            state, message = self._run_one(job)
            with self._lock:
                self._running = None
                self._finish(job, state, message)
            self._persist(job)

    def _run_one(self, job: Job) -> tuple[State, str]:
        """Run the job; every outcome, failures included, becomes a final state and one message."""
        last_stage = [job.stage]

        def progress(stage: str, fraction: float) -> None:
            with self._lock:
                job.stage, job.progress = stage, max(job.progress, min(max(fraction, 0.0), 1.0))
            if stage != last_stage[0]:  # a stage change is worth a disk write, a step is not
                last_stage[0] = stage
                self._persist(job)

        try:
            timings, warnings = self._run(job, progress, job.cancel.is_set)
        except Cancelled:
            if self._closing:
                return State.FAILED, STOPPED_WHILE_RUNNING
            return State.CANCELLED, "cancelled by the client."
        except InputError as error:
            return State.FAILED, str(error)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            log.exception("job %s ran out of memory", job.id)
            return State.FAILED, (
                "the device ran out of memory during the reconstruction; choose a smaller preset, texture size "
                "or fewer views, or free memory used by other programs, and submit it again."
            )
        except Exception as error:  # a bug must fail one job, never the service
            log.exception("job %s failed", job.id)
            return State.FAILED, f"the reconstruction failed with an internal error ({type(error).__name__}: {error})."
        with self._lock:
            job.timings.update(timings)
            job.warnings.extend(warnings)
        return State.DONE, "done; fetch the result."

    def _finish(self, job: Job, state: State, message: str) -> None:
        """Record a final state (caller holds the lock); the inputs are no longer needed."""
        job.state, job.message, job.finished_at = state, message, time.time()
        if state == State.DONE:
            job.stage, job.progress = "done", 1.0
        if job.started_at is not None:
            job.timings["total"] = job.finished_at - job.started_at
        shutil.rmtree(job.folder / INPUT, ignore_errors=True)
        log.info("job %s %s: %s", job.id, state.value, message)

    @staticmethod
    def _queue_message(position: int) -> str:
        return "waiting for the GPU" + (f" ({position} jobs ahead)" if position else " (next)")

    # ------------------------------------------------------------------ disk

    def _persist(self, job: Job) -> None:
        """Write the job's status file. Never called with `_lock` held: the lock order is `_disk`, then `_lock`."""
        with self._disk:
            with self._lock:
                status = job.status()
            if job.folder.is_dir():  # a deleted job's folder is not brought back
                _write_json(job.folder / STATUS, status)

    def _recover(self) -> None:
        """Load the jobs a previous run of the service left; unfinished ones become failed, saying why."""
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith("."):  # an upload that was being checked when the service stopped
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                job = Job.from_status(folder, json.loads((folder / STATUS).read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("removing job folder %s: its status cannot be read (%s)", folder.name, error)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if job.state in (State.QUEUED, State.RUNNING):
                message = STOPPED_WHILE_RUNNING if job.state == State.RUNNING else STOPPED_WHILE_QUEUED
                self._finish(job, State.FAILED, message)
                self._persist(job)
            self._jobs[job.id] = job
        if self._jobs:
            log.info("found %d jobs of a previous run in %s", len(self._jobs), self.root)

    def _sweep_forever(self) -> None:
        period = max(0.5, min(60.0, self.keep_fetched_s / 2, self.max_age_s / 2))
        while True:
            with self._lock:
                if self._wakeup.wait_for(lambda: self._closing, timeout=period):
                    return
            self.sweep()

    def sweep(self, now: float | None = None) -> list[str]:
        """Forget and delete finished jobs whose result was fetched long enough ago, or that are too old."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [
                job
                for job in self._jobs.values()
                if job.state in FINISHED
                and (
                    (job.fetched_at is not None and now - job.fetched_at > self.keep_fetched_s)
                    or now - (job.finished_at or job.created_at) > self.max_age_s
                )
            ]
            for job in expired:
                del self._jobs[job.id]
        for job in expired:
            shutil.rmtree(job.folder, ignore_errors=True)
            log.info("job %s expired; its files are removed", job.id)
        return [job.id for job in expired]


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(value, indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The reconstruction a job runs


class Reconstructor:
    """Runs `reconstruct` for a job on the service's device and writes the GLB and a preview beside it."""

    def __init__(
        self,
        device: torch.device,
        limits: UploadLimits,
        checkpoint: Path | None = None,
        preview_size: int = 128,
    ) -> None:
        if checkpoint is not None:
            load_model(checkpoint, device)  # validated and loaded once, at start; every job reuses it
        self.device, self.limits, self.checkpoint, self.preview_size = device, limits, checkpoint, preview_size
        self._preview_light: Environment | None = None  # loaded on the first preview, kept with its tables

    def __call__(
        self, job: Job, progress: Callable[[str, float], None], should_stop: Callable[[], bool]
    ) -> tuple[dict[str, float], list[str]]:
        timer = StageTimer()
        request = job.request
        options: dict[str, Any] = {"texture_size": request.texture_size, "target_faces": request.target_faces}
        if request.engine is not None:
            options["engine"] = request.engine
        if self.checkpoint is not None:
            options["checkpoint"] = self.checkpoint
        result: ReconstructionResult | None = None
        try:
            bundle = load_bundle(
                job.folder / job.bundle, max_views=self.limits.views, max_image_pixels=self.limits.image_pixels
            )
            timer.lap("load")
            bar = _ProgressBar(request.preset, progress)
            result = reconstruct(
                bundle,
                job.result,
                preset=request.preset,
                device=self.device,
                progress=bar,
                should_stop=should_stop,
                **options,
            )
            stages = {f"reconstruct {stage}": seconds for stage, seconds in result.timings.items() if stage != "total"}
            timer.seconds.update(stages)
            timer.lap("reconstruct")
            if self.preview_size > 0:
                bar("preview", 0.0)
                if self._preview_light is None:
                    self._preview_light = preview_environment(self.device)
                write_preview(result, bundle, job.preview, self.preview_size, self._preview_light)
                timer.lap("preview")
            return timer.seconds, result.warnings
        finally:
            # Nothing of a job may outlive it on the device: drop the field, then hand the cached blocks back.
            del result
            release_device_memory(self.device)

    @property
    def model_name(self) -> str | None:
        return None if self.checkpoint is None else self.checkpoint.name


class _ProgressBar:
    """Maps the engine's and the export's (stage, fraction) onto one 0..1 bar for the whole job."""

    def __init__(self, preset: str, report: Callable[[str, float], None]) -> None:
        refine = get_preset(preset).refine
        steps = {"visual hull": refine.prefit_steps, "coarse": refine.coarse_steps, "fine": refine.fine_steps}
        shares = {stage: ENGINE_SHARE * count / max(sum(steps.values()), 1) for stage, count in steps.items()}
        export = 1.0 - ENGINE_SHARE - PREVIEW_SHARE
        shares.update({stage: export * share for stage, share in EXPORT_SHARES.items()})
        shares["preview"] = PREVIEW_SHARE
        self.starts, self.shares, self.report = {}, shares, report
        start = 0.0
        for stage, share in shares.items():
            self.starts[stage], start = start, start + share

    def __call__(self, stage: str, fraction: float) -> None:
        if stage in self.shares:
            self.report(stage, self.starts[stage] + self.shares[stage] * fraction)
        else:
            self.report(stage, 0.0)  # the bar never goes back (the store keeps its maximum)


def preview_environment(device: torch.device, height: int = PREVIEW_LIGHT_HEIGHT) -> Environment:
    """The studio world, shrunk: a preview needs its soft light, not its sharp reflections, and a small
    map's split-sum tables take a fraction of a second to build instead of many on a CPU."""
    image = read_environment_image(builtin_environment("studio")).permute(2, 0, 1)[None]
    small = torch.nn.functional.interpolate(image, size=(height, 2 * height), mode="area")
    return Environment(small[0].permute(1, 2, 0).contiguous().to(device))


def write_preview(
    result: ReconstructionResult, bundle: Bundle, path: Path, size: int, environment: Environment
) -> Path:
    """Render the reconstructed field from the bundle's first camera, at most `size` pixels wide, as RGBA PNG.

    One fixed light (the service passes the studio world) for every preview: it shows the materials
    as they are, and its split-sum tables are built once per service, not once per job.
    """
    from PIL import Image

    field, normalisation = result.field, result.normalisation
    if field is None or normalisation is None:
        raise ValueError("the reconstruction result carries no field to preview")
    device = field.beta.device
    camera = bundle.cameras[[0]]
    scale = size / max(camera.width, camera.height)
    if scale < 1.0:
        camera = camera.resized(max(1, round(camera.width * scale)), max(1, round(camera.height * scale)))
    camera = normalisation.cameras_to_canonical(camera).to(device)
    with torch.no_grad():
        image = render_views(field, camera, environment, RenderOptions(samples=32, importance_samples=32))
    alpha = image.alpha[0].clamp(0.0, 1.0)
    colour = linear_to_srgb((image.rgb[0] / alpha.clamp_min(1e-6)).clamp(0.0, 1.0))
    pixels = (torch.cat([colour, alpha], dim=-1) * 255.0).round().to(torch.uint8).cpu().numpy()
    with atomic_file(path) as partial:
        Image.fromarray(pixels, "RGBA").save(partial, format="PNG")
    return path


def release_device_memory(device: torch.device) -> None:
    """Return cached device memory once a job's tensors are gone (the next job may need all of it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere: freed host memory goes back to the system after each job,
    so a long-lived service's size reflects what it holds, not the high-water mark of its last job."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None

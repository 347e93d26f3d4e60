"""The job store in-process, with stand-in runners: what happens to a job when its work fails or stalls."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from backend.errors import InputError
from backend.jobs import STOPPED_WHILE_QUEUED, STOPPED_WHILE_RUNNING, JobRequest, JobStore, QueueFull
from backend.refine import Cancelled


def queue_job(store: JobStore, name: str = "object"):
    with store.incoming() as folder:
        bundle = folder / "input" / name
        bundle.mkdir(parents=True)
        return store.submit(folder, bundle, JobRequest("cpu"), {"upload checks": 0.0})


def wait_until_finished(store: JobStore, job_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (status := store.status(job_id))["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    return status


def test_a_failing_job_fails_alone_and_the_worker_goes_on(tmp_path):
    errors = iter([RuntimeError("boom"), torch.cuda.OutOfMemoryError("CUDA out of memory"), InputError("bad view.")])

    def run(job, progress, should_stop):
        error = next(errors, None)
        if error is not None:
            raise error
        progress("coarse", 0.5)
        job.result.write_bytes(b"glTF")
        return {"reconstruct": 0.1}, ["a warning."]

    store = JobStore(tmp_path, run)
    try:
        jobs = [queue_job(store) for _ in range(4)]
        statuses = [wait_until_finished(store, job.id) for job in jobs]
    finally:
        store.close()
    assert [status["state"] for status in statuses] == ["failed", "failed", "failed", "done"]
    assert "internal error (RuntimeError: boom)" in statuses[0]["message"]
    assert "ran out of memory" in statuses[1]["message"]
    assert statuses[2]["message"] == "bad view."
    assert statuses[3]["warnings"] == ["a warning."] and statuses[3]["progress"] == 1.0
    assert {"queued", "reconstruct", "total"} <= set(statuses[3]["timings"])
    for job in jobs:  # inputs go when a job ends; status on disk matches memory
        assert not (job.folder / "input").exists()
        assert json.loads((job.folder / "status.json").read_text())["state"] == store.status(job.id)["state"]


def test_cancel_stops_a_running_job_at_its_next_step(tmp_path):
    started = threading.Event()

    def run(job, progress, should_stop):
        started.set()
        while True:  # an engine's steps, polling should_stop as refine does
            if should_stop():
                raise Cancelled("stopped")
            time.sleep(0.01)

    store = JobStore(tmp_path, run, max_queue=1)
    try:
        running = queue_job(store)
        assert started.wait(5)
        waiting = queue_job(store)
        with pytest.raises(QueueFull):
            queue_job(store)
        assert not any(path.name.startswith(".incoming") for path in store.root.iterdir())  # refused: removed
        assert store.cancel(waiting.id)["state"] == "cancelled"
        assert store.cancel(running.id)["state"] == "running"  # asked; it stops at the next step
        assert wait_until_finished(store, running.id)["state"] == "cancelled"
    finally:
        store.close()


def test_restart_marks_unfinished_jobs_failed_and_keeps_finished_ones(tmp_path):
    gate = threading.Event()

    def run(job, progress, should_stop):
        if job.bundle.endswith("quick"):
            job.result.write_bytes(b"glTF")
            return {}, []
        gate.wait(10)
        if should_stop():
            raise Cancelled("stopped")
        return {}, []

    store = JobStore(tmp_path, run)
    done = queue_job(store, "quick")
    wait_until_finished(store, done.id)
    running = queue_job(store, "slow")
    queued = queue_job(store, "slow")
    while store.status(running.id)["state"] != "running":
        time.sleep(0.01)
    (store.root / ".incoming-leftover").mkdir()  # an upload being checked when the service stopped
    # What a killed service leaves: its threads stop with the process, so simulate by reading the disk afresh.
    again = JobStore(tmp_path, run)
    try:
        assert again.status(running.id)["state"] == "failed"
        assert again.status(running.id)["message"] == STOPPED_WHILE_RUNNING
        assert again.status(queued.id)["message"] == STOPPED_WHILE_QUEUED
        assert again.status(done.id)["state"] == "done" and again.get(done.id).result.is_file()
        assert not (store.root / ".incoming-leftover").exists()
    finally:
        gate.set()
        store.close()
        again.close()


def test_results_expire_after_fetch_grace_or_maximum_age(tmp_path: Path):
    def run(job, progress, should_stop):
        job.result.write_bytes(b"glTF")
        return {}, []

    store = JobStore(tmp_path, run, keep_fetched_s=60.0, max_age_s=3600.0)
    try:
        fetched, kept, old = (queue_job(store) for _ in range(3))
        for job in (fetched, kept, old):
            wait_until_finished(store, job.id)
        store.mark_fetched(fetched.id)
        now = time.time()
        assert store.sweep(now) == []
        assert store.sweep(now + 61.0) == [fetched.id]
        assert set(store.sweep(now + 3601.0)) == {kept.id, old.id}
        assert not fetched.folder.exists() and store.get(kept.id) is None
    finally:
        store.close()

"""What the add-on knows at run time (not saved in .blend files): backend, views, job. The panels draw it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .capture import Views
from .client import Connection
from .local_backend import LocalBackend
from .tasks import Task

STOPPED, STARTING, READY, ERROR = "STOPPED", "STARTING", "READY", "ERROR"
IDLE, RUNNING, DONE, FAILED, CANCELLED = "IDLE", "RUNNING", "DONE", "FAILED", "CANCELLED"


@dataclass
class Session:
    backend: str = STOPPED
    backend_message: str = ""  # the error, or what the ready backend runs on
    health: dict = field(default_factory=dict)
    connection: Connection | None = None
    local: LocalBackend | None = None  # the child process, when the add-on started one
    python_report: str = ""  # what "Check Python" found
    views: Views | None = None
    views_message: str = ""  # why the last capture failed
    job: str = IDLE
    stage: str = ""
    progress: float = 0.0
    job_message: str = ""
    task: Task | None = None  # the running reconstruction
    result: Path | None = None

    def backend_ready(self, connection: Connection, health: dict) -> None:
        self.backend, self.connection, self.health = READY, connection, health
        gpu = health.get("gpu") or f"no GPU ({health.get('device', 'cpu')})"
        model = health.get("model") or "no model (refinement only)"
        self.backend_message = f"{gpu}, {model}"

    def backend_failed(self, message: str) -> None:
        self.backend, self.backend_message, self.connection, self.health, self.local = ERROR, message, None, {}, None

    def backend_stopped(self) -> None:
        self.backend, self.backend_message, self.connection, self.health, self.local = STOPPED, "", None, {}, None


SESSION = Session()


def reset() -> None:
    """A clean slate (unregister); in place, so every module's reference stays the one session."""
    SESSION.__dict__.update(Session().__dict__)

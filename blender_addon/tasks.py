"""Slow work off Blender's main thread (DESIGN §8): a worker thread per task, results back through a timer.

A task's `work` runs in its own thread and must not touch bpy; it may call `task.progress(...)`.
Its outcome and progress are queued, and `pump` (a `bpy.app.timers` callback, registered while any
task runs) hands them to the task's callbacks on the main thread, where bpy is safe. Nothing waits
in a modal loop, so nothing can hang the UI. Tests call `pump` themselves: timers never fire in
background mode.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

import bpy

from .client import BackendError

INTERVAL = 0.1  # seconds between deliveries
_TASKS: list[Task] = []


class Task:
    def __init__(
        self,
        work: Callable[[Task], Any],
        on_done: Callable[[Any], None],
        on_error: Callable[[str], None],
        on_progress: Callable[..., None] = lambda *values: None,
    ) -> None:
        """on_done(value) runs on the main thread and returns a line for the user (or None); a BackendError
        it raises goes to on_error(message), as does one from `work`."""
        self.work, self.on_done, self.on_error, self.on_progress = work, on_done, on_error, on_progress
        self.stop = threading.Event()  # set to ask `work` to stop early (it decides when)
        self.outcome: tuple[str, str] | None = None  # ("INFO" | "ERROR", line) once delivered
        self.on_finish: Callable[[str, str], None] = lambda kind, line: None
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def progress(self, *values: Any) -> None:
        """Called from the worker: deliver `on_progress(*values)` on the main thread."""
        self._events.put(("progress", values))

    def running(self) -> bool:
        return self in _TASKS

    def run_here(self) -> tuple[str, str]:
        """Run the work in this thread and deliver at once (operators' synchronous `execute`)."""
        _TASKS.append(self)
        self._run()
        self._deliver()
        return self.outcome

    def _run(self) -> None:
        try:
            self._events.put(("done", self.work(self)))
        except BackendError as error:
            self._events.put(("error", str(error)))
        except Exception as error:  # a bug, not a user error: the console gets the traceback, the user one line
            traceback.print_exc()
            self._events.put(("error", f"unexpected error in the add-on ({type(error).__name__}: {error})."))

    def _deliver(self) -> bool:
        """Hand queued events to the callbacks; True once the task has finished."""
        while True:
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return False
            if kind == "progress":
                self.on_progress(*value)
                continue
            _TASKS.remove(self)
            if kind == "done":
                try:
                    self.outcome = ("INFO", self.on_done(value) or "")
                except BackendError as error:
                    kind, value = "error", str(error)
            if kind == "error":
                self.on_error(value)
                self.outcome = ("ERROR", value)
            self.on_finish(*self.outcome)
            return True


def start(task: Task) -> Task:
    _TASKS.append(task)
    task._thread.start()
    if not bpy.app.timers.is_registered(pump):
        bpy.app.timers.register(pump, first_interval=INTERVAL, persistent=True)  # survives loading a file
    return task


def pump() -> float | None:
    """The timer: deliver every task's events on the main thread; unregisters itself when none is left."""
    for task in list(_TASKS):
        task._deliver()
    redraw()
    return INTERVAL if _TASKS else None


def wait(task: Task, timeout: float) -> None:
    """Block until the task's thread ends, then deliver its events (tests, and background mode)."""
    task._thread.join(timeout)
    if task._thread.is_alive():
        raise TimeoutError(f"the task did not finish within {timeout} s")
    pump()


def stop_all(timeout: float = 5.0) -> None:
    """Ask every task to stop and drop them; the timer goes too (unregister)."""
    for task in list(_TASKS):
        task.stop.set()
        task._thread.join(timeout)
    _TASKS.clear()
    if bpy.app.timers.is_registered(pump):
        bpy.app.timers.unregister(pump)


def redraw() -> None:
    """Ask the 3D viewports to redraw, so the sidebar shows the new state."""
    window_manager = getattr(bpy.context, "window_manager", None)
    for window in getattr(window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()

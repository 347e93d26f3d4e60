"""The bundled backend as a child process of Blender (stdlib only, no bpy).

`python -m backend serve --port 0` is started with the user's PyTorch-enabled Python, without a
shell, from the folder that holds the bundled `backend/` package. The service prints one JSON line
when it listens (url, port, token file, pid); everything else it says goes to a log file, whose last
line explains a failed start. The child ends with Blender: `stop_all` runs from `atexit` and from
the add-on's `unregister` (register adds it to `atexit`). Portable: pathlib paths, no signals or POSIX-only calls.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .client import BackendError, Connection

START_TIMEOUT = 180.0  # importing torch on a slow, busy machine takes a while
CHECK_TIMEOUT = 120.0
# On Windows a console program started from Blender would open a console window.
_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)
_RUNNING: set[LocalBackend] = set()


def backend_root() -> Path:
    """The folder holding the `backend` package: the extension's own (built zip) or the repository (sources)."""
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent):
        if (folder / "backend" / "__main__.py").is_file():
            return folder
    raise BackendError(f"the bundled backend was not found next to the add-on ({here}); reinstall the extension.")


def python_candidates(root: Path) -> list[Path]:
    """Pythons that may have PyTorch, best guess first: a virtual environment beside the backend, then PATH."""
    venv = root / ".venv"
    found = [venv / "Scripts" / "python.exe", venv / "bin" / "python"]
    found += [Path(path) for name in ("python3", "python") if (path := shutil.which(name))]
    found.append(Path(sys.executable))  # the bpy module's own Python; Blender's has no PyTorch and is skipped
    return [path for path in dict.fromkeys(found) if path.is_file()]


def check_python(python: Path, root: Path, timeout: float = CHECK_TIMEOUT) -> dict:
    """Run `python -m backend info --json`: versions, device, GPU. BackendError when this Python cannot."""
    python = _existing(python)
    try:
        done = subprocess.run(
            [str(python), "-m", "backend", "info", "--json"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
            creationflags=_NO_WINDOW,
        )
    except subprocess.TimeoutExpired:
        raise BackendError(f"Python '{python}' took over {timeout:g} s to report; check that it works.") from None
    except OSError as error:
        raise BackendError(f"Python '{python}' cannot be run ({error.strerror}); choose another one.") from None
    if done.returncode != 0:
        raise _wrong_python(python, done.stderr)
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise _wrong_python(python, done.stdout + done.stderr) from None


def find_python(root: Path) -> tuple[Path, dict]:
    """The first candidate Python that runs the backend, with its report."""
    candidates = python_candidates(root)
    for python in candidates:
        try:
            return python, check_python(python, root)
        except BackendError:
            continue
    tried = ", ".join(str(path) for path in candidates) or "none found"
    raise BackendError(f"no Python with PyTorch was found (tried: {tried}); set one in the add-on's preferences.")


@dataclass(eq=False)  # compared and hashed by identity: the set of running children holds them
class LocalBackend:
    """One `serve` child process; `start` returns the connection once it listens."""

    python: Path | None  # None: find one before starting
    root: Path
    work_dir: Path
    device: str = "auto"
    process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.work_dir / "service.log"

    def start(self, timeout: float = START_TIMEOUT) -> Connection:
        python = _existing(self.python)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        command = [str(python), "-m", "backend", "serve", "--port", "0", "--work-dir", str(self.work_dir)]
        command += ["--device", self.device]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.work_dir / "stderr.log", "wb") as stderr:
            try:
                self.process = subprocess.Popen(
                    command,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=environment,
                    creationflags=_NO_WINDOW,
                )
            except OSError as error:
                raise BackendError(f"Python '{python}' cannot be run ({error.strerror}); choose another one.") from None
        _RUNNING.add(self)
        line = self._first_line(timeout)
        try:
            start = json.loads(line)
            token = Path(start["token_file"]).read_text(encoding="utf-8").strip()
        except (ValueError, KeyError, OSError):
            self.stop()
            raise _wrong_python(python, self._stderr()) from None
        return Connection(start["url"], token)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """End the child: a polite terminate, then kill if it lingers."""
        _RUNNING.discard(self)
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if process.stdout is not None:
            process.stdout.close()

    def _first_line(self, timeout: float) -> str:
        """The start line, or '' when the child exits or stays silent past `timeout`."""
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.process.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            return lines.get(timeout=timeout).decode("utf-8", "replace")
        except queue.Empty:
            self.stop()
            raise BackendError(
                f"the backend did not start within {timeout:g} s; see {self.work_dir / 'stderr.log'}."
            ) from None

    def _stderr(self) -> str:
        try:
            return (self.work_dir / "stderr.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def stop_all() -> None:
    """Stop every child this add-on started (unregister, and Blender's exit through atexit)."""
    for backend in list(_RUNNING):
        backend.stop()


def _existing(python: Path) -> Path:
    if not Path(python).is_file():
        raise BackendError(f"Python '{python}' does not exist; set the backend's Python in the add-on's preferences.")
    return Path(python)


def _wrong_python(python: Path, output: str) -> BackendError:
    """The last meaningful line of a failed start (e.g. "No module named 'torch'") in one sentence."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reason = lines[-1] if lines else "it exited without a word"
    reason = reason.removeprefix("error: ").removeprefix("ModuleNotFoundError: ").rstrip(".")
    return BackendError(
        f"Python '{python}' cannot run the backend ({reason}); choose a Python that has PyTorch and the backend's "
        "packages in the add-on's preferences."
    )

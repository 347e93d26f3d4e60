"""Progress reporting: long work calls `progress(stage, fraction)`; the CLI draws a bar.

The same callback shape is what the service will forward to clients (stage name, 0..1).
"""

import sys
import time
from collections.abc import Callable
from typing import TextIO

Progress = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """A progress callback that reports nothing."""


class TerminalProgress:
    """A one-line progress bar on a terminal (plain lines when not a TTY)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream, self.width = stream, width
        self.stage, self.start, self.last_line = "", time.perf_counter(), 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        now = time.perf_counter()
        if stage != self.stage:
            if self.stage and self.stream.isatty():
                self.stream.write("\n")
            self.stage, self.start, self.last_line = stage, now, 0.0
        filled = round(fraction * self.width)
        line = f"{stage:<16} [{'#' * filled}{'.' * (self.width - filled)}] {fraction:4.0%} {now - self.start:6.1f}s"
        if self.stream.isatty():
            self.stream.write("\r" + line)
            if fraction >= 1.0:
                self.stream.write("\n")
                self.stage = ""
        elif fraction >= 1.0 or now - self.last_line > 5.0 or self.last_line == 0.0:
            self.stream.write(line + "\n")
            self.last_line = now
        self.stream.flush()


class StageTimer:
    """Seconds spent in each stage of a pipeline: call `lap(stage)` as each stage ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage], self._clock = now - self._clock, now

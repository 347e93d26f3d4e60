"""Named sections of the model's forward: profiler labels always, wall times when a benchmark asks.

`section(name)` labels a region for `torch.profiler` (one `record_function`, microseconds when no
profiler runs). Inside `section_times(device)`, each section also synchronises the device at its
edges and adds its wall time to the dict that context yields, so a benchmark can say where a forward
spends its time. Synchronising removes overlap between sections: use it for a profiling run, not for
the run whose total time is reported.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class SectionTime:
    seconds: float = 0.0
    calls: int = 0
    depth: int = 0  # sections inside other sections are counted in their parents' time too


_clocks: list[tuple[torch.device, dict[str, SectionTime]]] = []  # the active `section_times`, innermost last
_depth = 0


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Label this region `name` for the profiler and, inside `section_times`, time it."""
    global _depth
    with torch.profiler.record_function(name):
        if not _clocks:
            yield
            return
        device, times = _clocks[-1]
        entry = times.setdefault(name, SectionTime(depth=_depth))
        _synchronise(device)
        begin = time.perf_counter()
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            _synchronise(device)
            entry.seconds += time.perf_counter() - begin
            entry.calls += 1


@contextlib.contextmanager
def section_times(device: torch.device) -> Iterator[dict[str, SectionTime]]:
    """Time every `section` entered inside this region, in order of first entry."""
    times: dict[str, SectionTime] = {}
    _clocks.append((device, times))
    try:
        yield times
    finally:
        _clocks.pop()


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

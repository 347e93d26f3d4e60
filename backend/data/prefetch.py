"""A producer process that renders the scene pool's next scenes while training runs (`train --prefetch N`).

Rendering a ViewSet is launch-bound Python, so inline it leaves the GPU idle for a large part of each
step, and a thread would fight the training loop for the GIL. The seeds the pool needs come in a known
order (`ScenePool.first_seed`: the pool's seeds, then one more per refresh), so one process per rank
renders exactly those seeds, in that order, at most N ahead, on the same device, and hands them over
through a torch.multiprocessing queue (CUDA tensors by IPC, CPU tensors by shared memory).
`Prefetcher` is the training side: a drop-in `make(seed)` for the pool that checks it gets the seed it
asked for, so a prefetching run sees the same data as an inline or resumed one.

What travels: a ViewSet without its environment, plus the world's name and rotation; the trainer
rebuilds the environment from its own `EnvironmentBank`, so every scene keeps sharing one loaded image
and its split-sum tables (pickling it would send a copy of both with every scene). The true field
(`truth`: a procedural object or a furniture grid) is plain tensors and travels as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import resource
import signal
import time
import traceback

import torch
import torch.multiprocessing as mp

from .sources import SourceSpec
from .views import EnvironmentBank, ViewSet

POLL = 0.5  # seconds between liveness checks while either side waits
STOP_GRACE = 5.0  # seconds the producer gets to finish on its own before it is killed


def _put(channel, item: tuple, stop, parent) -> bool:
    """Put `item`, waiting for room while the trainer still wants scenes; False when it no longer does."""
    while not stop.is_set() and parent.is_alive():
        try:
            channel.put(item, timeout=POLL)
            return True
        except queue.Full:
            continue
    return False


def _produce(spec: SourceSpec, first: int, channel, stop, threads: int) -> None:
    """The producer's main: render seeds first, first + 1, ... until stopped; on an error, send it and wait."""
    # The trainer decides when this process stops: Ctrl-C and SIGTERM reach the whole process group, and
    # on SIGTERM the trainer still needs scenes to finish its step and save. An orphan notices its
    # parent is gone in `_put`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    device = torch.device(spec.device)
    # On a CPU the trainer's count (CPU results can depend on it). On a GPU one thread: the renders run on
    # the GPU, and a second process spinning as many OpenMP threads as the trainer starves them both
    # (one H200, torchrun with one process: 0.90x of inline with the trainer's 16 threads).
    torch.set_num_threads(threads if device.type == "cpu" else 1)
    parent = mp.parent_process()
    seed = first
    try:
        if device.type == "cuda" and device.index is not None:  # a torchrun rank's GPU ("cuda" alone: the default)
            torch.cuda.set_device(device)
        bank = spec.bank()
        make = spec.build(bank)
        while not stop.is_set():
            viewset = make(seed)
            world = bank.name_of(viewset.environment), viewset.environment.rotation_z
            if not _put(channel, ("scene", seed, dataclasses.replace(viewset, environment=None), world), stop, parent):
                return
            seed += 1
    except Exception:
        _put(channel, ("error", seed, traceback.format_exc(), None), stop, parent)
    # Stay until told to stop: scenes still in the queue can only be received while their sender lives.
    while not stop.wait(POLL) and parent.is_alive():
        pass


class Prefetcher:
    """seed -> ViewSet for a `ScenePool`, served in order by a producer process rendering `ahead` scenes ahead.

    Use it as a context manager (or call `close`): the producer is stopped at the end, on an error and
    on Ctrl-C. The caller drops the scenes it received before closing: on CUDA the producer owns their
    memory.
    """

    def __init__(self, spec: SourceSpec, first: int, ahead: int, bank: EnvironmentBank, timeout: float = 900.0) -> None:
        if ahead < 1:
            raise ValueError("a prefetcher renders at least one scene ahead")
        context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        # Each CPU tensor received holds a file descriptor (about 35 per scene): a pool of 24 would pass
        # the usual soft limit of 1024, so take what the hard limit allows.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))
        self.bank, self.timeout, self.next_seed = bank, timeout, first
        self.channel = context.Queue(maxsize=ahead)
        self.stop = context.Event()
        arguments = (spec, first, self.channel, self.stop, torch.get_num_threads())
        self.process = context.Process(target=_produce, args=arguments, name="scene producer", daemon=True)
        self.process.start()

    def __call__(self, seed: int) -> ViewSet:
        if seed != self.next_seed:
            raise RuntimeError(f"the scene pool asked for seed {seed}; the producer renders seed {self.next_seed} next")
        kind, sent, payload, world = self._receive(seed)
        if kind == "error":
            raise RuntimeError(f"the scene producer failed on seed {sent}:\n{payload}")
        if sent != seed:
            raise RuntimeError(f"the scene producer sent seed {sent} where seed {seed} was due")
        self.next_seed += 1
        return dataclasses.replace(payload, environment=self.bank.rotated(*world))

    def _receive(self, seed: int) -> tuple:
        deadline = time.monotonic() + self.timeout
        while True:
            alive = self.process.is_alive()  # before the read: what it sent before it died is read first
            try:
                return self.channel.get(timeout=POLL)
            except queue.Empty:
                if not alive:
                    raise self._died(seed) from None
            except Exception as error:  # a scene whose sender is gone cannot be received
                if self.process.is_alive():
                    raise
                raise self._died(seed) from error
            if time.monotonic() > deadline:
                raise RuntimeError(f"the scene producer sent nothing for seed {seed} in {self.timeout:.0f} s")

    def _died(self, seed: int) -> RuntimeError:
        self.process.join(POLL)
        return RuntimeError(f"the scene producer died (exit code {self.process.exitcode}) before sending seed {seed}")

    def close(self) -> None:
        """Stop the producer (kill it if it does not stop within a few seconds) and wait until it is gone."""
        self.stop.set()
        deadline = time.monotonic() + STOP_GRACE
        while self.process.is_alive() and time.monotonic() < deadline:
            self._drain()  # a producer blocked on a full pipe can then exit
            self.process.join(0.1)
        if self.process.is_alive():
            self.process.kill()  # mid-render: nothing of it is needed any more
            self.process.join()
        self._drain()
        self.channel.close()

    def _drain(self) -> None:
        try:
            while True:
                self.channel.get_nowait()
        except Exception:  # empty, closed, or a scene whose producer is already gone
            pass

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

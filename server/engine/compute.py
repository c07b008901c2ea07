"""The compute threads: every engine computation of a server runs on one of a few fixed
threads, handed to it by the thread that serves the call.

Why not on the serving threads themselves: torch's CPU operators run in OpenMP parallel
regions, and libgomp keeps one team of threads per thread that starts a region. A gRPC
server calls from many threads, so each one grew a team of its own; once a process holds
more OpenMP threads than CPUs, libgomp stops letting the idle threads of a team spin between
regions (its spin count is throttled) and they sleep instead, so every parallel region
begins by waking a thread. timm's regnety_002 at batch 2 enters 1,158 parallel regions per
forward and backward pass: served from many threads, that was 1,158 voluntary context
switches per call where the same pass in-process has none (bench/zoo.py, docs/performance.md).
One computation at a time per set of cores keeps one team, as in-process, and one warm
malloc arena instead of one per serving thread.

The serving thread blocks until its computation is done; work that a computation hands
on (a merged batch, an adversarial step) runs inline on the compute thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_here = threading.local()
"""`inside` is True on a compute thread."""


def default_threads(device: torch.device) -> int:
    """How many computations a device runs well at once: on the CPU one, which uses every
    core through torch's intra-op threads; on a GPU two, so that one's Python and kernel
    launches overlap the other's kernels."""
    return 2 if device.type == "cuda" else 1


class _Job:
    __slots__ = ("fn", "args", "result", "error", "done")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()


class Compute:
    """A few fixed threads that run computations in arrival order; with 0 threads, every
    computation runs on its caller's thread (in-process use, tests)."""

    def __init__(self, threads: int = 0, name: str = "gradtap-compute") -> None:
        if threads < 0:
            raise ValueError("compute threads must be at least 0")
        self.threads = threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a compute thread; its result, or its exception raised here."""
        if not self._workers or getattr(_here, "inside", False):
            return fn(*args)
        job = _Job(fn, args)
        self._queue.put(job)
        job.done.acquire()  # released by the compute thread when the job is done
        if job.error is not None:
            error, job.error = job.error, None
            try:
                raise error
            finally:
                # The traceback holds this frame, and the frame the error: without this the
                # pair (and every tensor of the failed computation's frames) waits for the
                # cyclic garbage collector, which an idle server may not run for minutes.
                del error
        result: T = job.result
        return result

    def iterate(self, items: Iterator[T]) -> Iterator[T]:
        """The items of an iterator whose every step computes, each step on a compute thread
        (other calls' computations interleave between steps)."""
        end = object()
        while True:
            item = self.run(next, items, end)
            if item is end:
                return
            yield item

    def close(self, timeout: float = 10.0) -> None:
        """Stops the threads once the computations queued so far are done."""
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout)
        self._workers = []

    def _work(self) -> None:
        _here.inside = True
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                job.error = e
            finally:
                job.done.release()
            del job


def on_compute_thread() -> bool:
    """True on a compute thread."""
    return bool(getattr(_here, "inside", False))

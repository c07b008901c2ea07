"""A call's peak working memory, estimated from the graph's shapes before any work is done,
and the server's one memory budget that calls and model loads are admitted against.

The estimate counts what a call keeps alive at its peak: the decoded inputs, every node's
value kept for the backward pass and the gradients flowing back through them, the batched
internals of an attribution method (one forward pass over `pass rows`: integration steps
times rows, noisy samples times rows), the parameters' gradients when asked for, and the
result. It is meant to be conservative: `bench/memory_estimate.py` compares it with
measured peaks (docs/memory.md gives the figures).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Cancelled, InvalidArgument, ResourceExhausted
from ..models.model import Dim, Model, bindings, size_of
from .analysis import Analysis
from .budget import result_bytes

MEMORY_BUDGET = "MEMORY_BUDGET"
"""The reason of a call or load refused because it could never fit the memory budget."""

DEFAULT_BUDGET = "50%"
"""The budget unless the operator sets one: half of the machine's memory (or the GPU's)."""

BACKWARD_FACTOR = 2
"""Bytes held per byte of node values: the values kept for the backward pass, and as much
again for the gradients flowing back through them (calibrated: docs/memory.md)."""

OVERHEAD_BYTES = 16 << 20
"""Bytes a call takes whatever its size: its buffers, torch's and the allocator's slack."""

TRIM_AFTER_BYTES = 64 << 20
"""A hold at least this large, once given back, has the C allocator return its free pages."""

TRIM_DELAY_SECONDS = 0.5
"""How long after such a hold the pages are returned: the call's last tensors (its result,
freed once the call has ended; the frames of a stopped call) go first."""

TRIM_AGAIN_SECONDS = 5.0
"""And again this long after, if no heavy hold ended meanwhile."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


# -- the machine ------------------------------------------------------------------------------


def machine_bytes(device: torch.device) -> int:
    """The memory calls use on `device`: the GPU's own, or the host's physical memory (less,
    when a cgroup, e.g. a container's memory limit, grants less)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            physical = min(physical, int(text))
    return int(physical)


def parse_budget(text: str, machine: int) -> int:
    """`--memory-budget`: bytes (`8GiB`, `512MB`, `1e9`) or a share of `machine` (`50%`)."""
    value = text.strip().lower().replace(" ", "")
    try:
        if value.endswith("%"):
            share = float(value[:-1])
            if not 0 < share <= 100:
                raise ValueError
            total = int(machine * share / 100)
        else:
            digits = value.rstrip("kmgtib")
            unit = value[len(digits) :]
            if unit not in _UNITS:
                raise ValueError
            total = int(float(digits) * _UNITS[unit])
    except ValueError:
        raise ValueError(
            f"--memory-budget {text!r}: give bytes (8GiB, 512MiB, 2GB, 1e9) or a share of "
            f"the machine's memory (50%)"
        ) from None
    if total < 1 << 20:
        raise ValueError(f"--memory-budget {text!r} is under 1 MiB: no call could run")
    return total


def text_bytes(n: int) -> str:
    """Bytes for people: 1.50 GiB, 12.0 MiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


# -- the estimate -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A call's peak working memory, and the request field that shrinks it most."""

    nbytes: int
    shrink: str
    """What to make smaller, in the request's words: `inputs (the batch)`, `params.n_steps`."""


def _size(dim: Dim, bound: dict[str, int]) -> int:
    size = size_of(dim, bound)
    if size is not None:
        return size
    return dim.max if dim.max is not None else 1


def node_bytes(model: Model, bound: dict[str, int]) -> int:
    """The bytes of every node's value for inputs whose symbols are `bound`: what one forward
    pass keeps for the backward pass, at most (views and in-place results are counted too)."""
    total = 0
    for info in model.nodes.values():
        total += math.prod(_size(d, bound) for d in info.spec.dims) * info.spec.dtype.itemsize
    return total


def row_bytes(model: Model) -> int:
    """The node bytes one batch row costs (dynamic dimensions other than the batch at 1, or
    at their maximum when the graph computes them)."""
    total = 0
    for info in model.nodes.values():
        dims = info.spec.dims[1:]
        elements = math.prod(d.size if d.size is not None else 1 for d in dims)
        total += elements * info.spec.dtype.itemsize
    return max(total, 1)


def _tensors_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _params_bytes(model: Model) -> int:
    return sum(v.numel() * v.element_size() for _, v, is_param in model.state if is_param)


def analysis_bytes(model: Model, analysis: Analysis) -> Estimate:
    """One Analyze call, or one AnalyzeMany item: its inputs (the request's and the decoded
    copy), a forward and backward pass, parameter gradients, the result."""
    bound = bindings(model, analysis.inputs)
    nodes = node_bytes(model, bound)
    total = 2 * _tensors_bytes(analysis.inputs) + BACKWARD_FACTOR * nodes
    if analysis.corrupt_inputs:  # one more forward pass, without gradients
        total += 2 * _tensors_bytes(analysis.corrupt_inputs) + nodes
    if analysis.param_grads:
        total += _params_bytes(model)
    total += result_bytes(model, analysis) + OVERHEAD_BYTES
    return Estimate(total, "inputs (the batch)")


def pass_bytes(model: Model, rows: int, inputs: Sequence[torch.Tensor]) -> int:
    """One forward and backward pass over `rows` rows built from `inputs` (an attribution's
    batch of steps or samples): their node values and gradients, and the built inputs."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    bound = bindings(model, inputs)
    per_row = node_bytes(model, bound) / max(batch, 1)
    inputs_per_row = _tensors_bytes(inputs) / max(batch, 1)
    return int(rows * (BACKWARD_FACTOR * per_row + 3 * inputs_per_row))


def attribution_bytes(
    model: Model, inputs: Sequence[torch.Tensor], rows_per_pass: int, shrink: str
) -> Estimate:
    """An attribution: the inputs, one pass over `rows_per_pass` rows, and the accumulated
    attribution and its copies (each the size of the inputs)."""
    total = 5 * _tensors_bytes(inputs) + pass_bytes(model, rows_per_pass, inputs)
    return Estimate(total + OVERHEAD_BYTES, shrink)


def perturbation_bytes(model: Model, inputs: Sequence[torch.Tensor]) -> Estimate:
    """A perturbation: one analysis per step with the input gradient, and the loop's own
    tensors (the original, the adversarial input, its step, the mask), each input-sized."""
    step = analysis_bytes(model, Analysis(inputs=inputs, input_gradients=True))
    return Estimate(step.nbytes + 4 * _tensors_bytes(inputs), step.shrink)


def largest_rows(model: Model, inputs: Sequence[torch.Tensor], nbytes: int) -> int:
    """The most rows one attribution pass may take within `nbytes` (at least 1)."""
    per_row = pass_bytes(model, 1, inputs)
    return max(1, nbytes // max(per_row, 1))


# -- the budget -------------------------------------------------------------------------------


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None on a C library without it.

    torch frees a tensor with free(): one over the allocator's mmap threshold (which glibc
    raises as large blocks are freed, up to 32 MiB) goes back to the system at once, smaller
    ones stay in the process's heaps for reuse. After a heavy call those heaps can hold
    gigabytes nobody uses; malloc_trim hands their free pages back.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class _Trimmer:
    """Returns the C allocator's free pages shortly after heavy holds end, on its own thread."""

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def soon(self) -> None:
        if self._trim is None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gradtap-trim", daemon=True)
                self._thread.start()
        self._due.set()

    def _run(self) -> None:
        assert self._trim is not None
        while True:
            self._due.wait()
            self._due.clear()
            time.sleep(TRIM_DELAY_SECONDS)
            if self._due.is_set():  # asked again meanwhile: wait until it is quiet
                continue
            self._trim()
            # gRPC frees a cancelled call's buffered messages when it lets the call go,
            # which can come later: once more when all stays quiet.
            if not self._due.wait(TRIM_AGAIN_SECONDS):
                self._trim()


class MemoryBudget:
    """The server's one memory budget: calls and model loads hold their estimate while they
    run; one that does not fit now waits for others to give theirs back, and one that could
    never fit is refused at once (RESOURCE_EXHAUSTED, reason MEMORY_BUDGET).

    Waiting calls are served first come, first served, so a large call is not starved by a
    stream of small ones. `share` is what one pass of an attribution may take (the budget
    over the calls that may run at once): caller-chosen internal batch sizes are bounded by it.
    """

    def __init__(self, total: int, max_concurrent: int = 1) -> None:
        if total < 1:
            raise ValueError("the memory budget must be at least 1 byte")
        self.total = total
        self.share = max(1, total // max(1, max_concurrent))
        self._held = 0
        self._peak = 0
        self._waiting: list[object] = []
        self._changed = threading.Condition()
        self._trimmer = _Trimmer()

    @property
    def held(self) -> int:
        """Bytes held by running calls and loads now."""
        return self._held

    @property
    def peak(self) -> int:
        """The most bytes held at once since the server started."""
        return self._peak

    def refusal(self, estimate: Estimate, what: str) -> ResourceExhausted:
        """The error of a call or load that could never fit."""
        return ResourceExhausted(
            f"{what} would need about {text_bytes(estimate.nbytes)} of working memory, more "
            f"than this server's whole memory budget of {text_bytes(self.total)} (gradtap "
            f"serve --memory-budget); make {estimate.shrink} smaller",
            reason=MEMORY_BUDGET,
            metadata={
                "memory_budget_bytes": str(self.total),
                "estimated_bytes": str(estimate.nbytes),
                "shrink": estimate.shrink,
            },
        )

    @contextmanager
    def hold(
        self,
        estimate: Estimate,
        what: str,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[None]:
        """Holds `estimate` for the block; waits until it fits, raising Cancelled if
        `should_stop` turns true first. Refuses at once what could never fit."""
        nbytes = max(0, estimate.nbytes)
        try:
            if nbytes > self.total:
                raise self.refusal(estimate, what)
            self._wait(nbytes, should_stop)
            try:
                yield
            finally:
                with self._changed:
                    self._held -= nbytes
                    self._changed.notify_all()
        finally:
            # Heavy calls (held, refused or given up) leave free pages in the C heaps: their
            # request's bytes, their tensors. Hand them back once they are freed.
            if nbytes >= TRIM_AFTER_BYTES or self._held == 0:
                self._trimmer.soon()

    def _wait(self, nbytes: int, should_stop: Callable[[], bool]) -> None:
        """Returns holding `nbytes`, first come first served; raises Cancelled on a stop."""
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self._held + nbytes > self.total:
                    if should_stop():
                        raise Cancelled(
                            f"the call ended while it waited for {text_bytes(nbytes)} of "
                            "the memory budget",
                            reason="CANCELLED",
                        )
                    self._changed.wait(0.05)
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()
            self._held += nbytes
            self._peak = max(self._peak, self._held)

    def reserve(self, nbytes: int, what: str) -> AbstractContextManager[None]:
        """The registry's admission hook for model loads (models.registry.Reserve)."""
        return self.hold(Estimate(nbytes, "the archive"), what)


def check_batch_parameter(name: str, value: int, largest: int, why: str) -> None:
    """Refuses a caller's batch parameter over what the budget allows (OUT_OF_RANGE)."""
    if value > largest:
        raise InvalidArgument(
            f"{name} is {value}; this server's memory budget allows at most {largest} ({why})",
            reason="OUT_OF_RANGE",
            field=f"params.{name}",
        )

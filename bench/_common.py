"""Shared by every benchmark: configuration, server subprocesses, bounded timing loops, stats."""

from __future__ import annotations

import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GB = 1e9


@dataclass(frozen=True)
class Config:
    """How big and how long: the full run, or `--quick` (small sizes, seconds not minutes)."""

    quick: bool
    repeats: int
    threads: int
    # overhead
    resnet_batch: int = 8
    resnet_image: int = 224
    # small calls
    small_calls: int = 2000
    small_warmup: int = 200
    # transport and peers: result sizes in bytes
    transport_bytes: int = 256 * MiB
    naive_bytes: tuple[int, ...] = (64 * MiB, 256 * MiB)
    # batching
    batch_clients: int = 16
    batch_seconds: float = 3.0
    # memory
    memory_bytes: int = 1 << 30
    # every loop stops after this long even if its count is not reached
    budget_s: float = 60.0

    @staticmethod
    def make(quick: bool, repeats: int | None, threads: int | None) -> Config:
        threads = threads or len(os.sched_getaffinity(0))
        if not quick:
            return Config(quick=False, repeats=repeats or 7, threads=threads)
        return Config(
            quick=True,
            repeats=repeats or 3,
            threads=threads,
            resnet_batch=2,
            resnet_image=64,
            small_calls=200,
            small_warmup=20,
            transport_bytes=16 * MiB,
            naive_bytes=(4 * MiB, 16 * MiB),
            batch_clients=4,
            batch_seconds=0.5,
            memory_bytes=64 * MiB,
            budget_s=10.0,
        )


# -------------------------------------------------------------------------------------------
# Statistics


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), without numpy."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, interquartile range) of repeated measurements."""
    return {
        "median": quantile(values, 0.5),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
        "q1": quantile(values, 0.25),
        "q3": quantile(values, 0.75),
        "n": len(values),
    }


@dataclass
class Section:
    """One benchmark's results: rows of measurements, the issue's targets, notes."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def row(
        self,
        name: str,
        unit: str,
        values: Sequence[float] | None,
        *,
        ratio: Sequence[float] | None = None,
        ratio_to: str = "",
        status: str = "ok",
        **extra: Any,
    ) -> dict[str, Any]:
        """Adds a measurement; `ratio` holds one ratio to `ratio_to` per repeat."""
        entry: dict[str, Any] = {"name": name, "unit": unit, "status": status}
        entry.update(stats(values) if values else {"median": None, "min": None, "max": None})
        if ratio:
            entry["ratio"] = {"to": ratio_to, **stats(ratio)}
        entry.update(extra)
        self.rows.append(entry)
        return entry

    def unavailable(self, name: str, why: str) -> None:
        self.rows.append(
            {"name": name, "unit": "", "status": "not available", "why": why, "median": None}
        )

    def target(
        self,
        name: str,
        goal: str,
        measured: float | None,
        met: bool | None,
        unit: str = "",
    ) -> None:
        self.targets.append(
            {"name": name, "goal": goal, "measured": measured, "unit": unit, "met": met}
        )

    def as_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "targets": self.targets, "notes": self.notes, "info": self.info}


# -------------------------------------------------------------------------------------------
# Bounded timing loops


def timed_calls(
    fn: Callable[[], object], count: int, budget_s: float, *, min_count: int = 1
) -> list[float]:
    """Seconds per call of `count` calls of fn, stopping early once `budget_s` has passed."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for i in range(count):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if i + 1 >= min_count and t1 > deadline:
            break
    return times


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    budget_s: float,
    *,
    calls: int = 1,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Runs every variant once per round, rotating their order, and returns for each variant
    its per-round time per call (the median of `calls` calls) in seconds.

    Measuring side by side in rounds means slow drift of the machine (other load, thermal
    state) hits every variant alike, so per-round ratios stay meaningful.
    """
    names = list(variants)
    for name in names:
        timed_calls(variants[name], warmup, budget_s)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + budget_s * rounds
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            per_round[name].append(quantile(timed_calls(variants[name], calls, budget_s), 0.5))
        if time.perf_counter() > deadline:
            break
    return per_round


def ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-round ratios value / baseline of two interleaved series."""
    return [v / b for v, b in zip(values, baseline) if b > 0]


# -------------------------------------------------------------------------------------------
# Processes


def thread_env(threads: int) -> dict[str, str]:
    """The environment for a child process whose torch uses `threads` intra-op threads."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # the children import the bench package from the repository root
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def gradtap_command() -> list[str]:
    """How to run the gradtap CLI of this interpreter's environment."""
    script = Path(sys.executable).parent / "gradtap"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gradtap.cli"]


class Child:
    """A subprocess that prints a ready line on stdout; stopped with SIGTERM, then SIGKILL.

    With `wait=False` the constructor returns at once; call `ready()` before use, so that
    several children can start up side by side.
    """

    def __init__(
        self,
        command: list[str],
        ready: re.Pattern[str],
        env: dict[str, str],
        timeout: float,
        *,
        stdin: bool = False,
        wait: bool = True,
    ) -> None:
        self.command = command
        self._ready_pattern = ready
        self._timeout = timeout
        self._log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=ROOT,
            text=True,
        )
        self._match: re.Match[str] | None = None
        if wait:
            self.ready()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def match(self) -> re.Match[str]:
        """The ready line's match."""
        return self.ready()

    def ready(self) -> re.Match[str]:
        """Waits until the ready line appears (once); raises with the child's log if not."""
        if self._match is not None:
            return self._match
        assert self.process.stdout is not None
        deadline = time.monotonic() + self._timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.process.stdout], [], [], max(0.0, left))
            if not readable:
                break
            line = self.process.stdout.readline()
            if not line:  # the process exited
                break
            seen.append(line)
            self._match = self._ready_pattern.search(line)
            if self._match:
                self.on_ready(self._match)
                return self._match
        log = self.log()
        self.stop()
        raise RuntimeError(
            f"{' '.join(self.command)} did not become ready within {self._timeout:.0f} s\n"
            f"stdout: {''.join(seen)[-2000:]}\nstderr: {log[-4000:]}"
        )

    def on_ready(self, match: re.Match[str]) -> None:
        """Reads what the ready line says; for subclasses."""

    def readline(self, timeout: float) -> str:
        """The child's next line on stdout; raises if none comes within `timeout` seconds."""
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else ""
        if not line:
            raise RuntimeError(
                f"{' '.join(self.command)} said nothing within {timeout:.0f} s or exited\n"
                f"stderr: {self.log()[-3000:]}"
            )
        return line

    def log(self) -> str:
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read()

    def stop(self, grace: float = 10.0) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(grace)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if not self._log.closed:
            self._log.close()


SERVING = re.compile(r"gradtap serving (\d+) model\(s\) on (\S+):(\d+)")


class GradtapServer(Child):
    """`gradtap serve --port 0 --device cpu ...` in a subprocess, not sharing our GIL."""

    def __init__(
        self,
        threads: int,
        repository: Path | None = None,
        builtins: bool = True,
        extra: Sequence[str] = (),
        timeout: float = 180.0,
        *,
        wait: bool = True,
        device: str = "cpu",
    ) -> None:
        command = [*gradtap_command(), "serve", "--port", "0", "--device", device, "--grace", "0"]
        if repository is not None:
            command += ["--model-repository", str(repository)]
        if not builtins:
            command.append("--no-builtins")
        command += list(extra)
        self.address = ""
        self.models = 0
        super().__init__(command, SERVING, thread_env(threads), timeout, wait=wait)

    def on_ready(self, match: re.Match[str]) -> None:
        self.address = f"{match.group(2)}:{match.group(3)}"
        self.models = int(match.group(1))


def serve_help() -> str:
    """`gradtap serve --help`, to find out which flags this version has."""
    result = subprocess.run(
        [*gradtap_command(), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    return result.stdout


def proc_status(pid: int) -> dict[str, int]:
    """The Vm* lines of /proc/<pid>/status, in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith("Vm") and rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM of a process we own to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def process_counters(pid: int) -> dict[str, float]:
    """Counters of a process that do not depend on a quiet machine: minor page faults, and
    voluntary and involuntary context switches summed over its threads; with its CPU seconds
    and its thread count (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    counters = {
        "minor_faults": float(fields[7]),
        "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
        "voluntary_switches": 0.0,
        "involuntary_switches": 0.0,
        "threads": 0.0,
    }
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        counters["voluntary_switches"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        counters["involuntary_switches"] += int(line.split()[1])
        except OSError:  # the thread ended meanwhile
            continue
        counters["threads"] += 1
    return counters


def per_call_counters(pid: int, fn: Callable[[], object], calls: int) -> dict[str, float]:
    """The change of `process_counters(pid)` per call of fn, over `calls` calls (untimed:
    reading /proc between calls would distort the times)."""
    before = process_counters(pid)
    for _ in range(calls):
        fn()
    after = process_counters(pid)
    keys = ("minor_faults", "voluntary_switches", "involuntary_switches", "cpu_s")
    out = {key: (after[key] - before[key]) / calls for key in keys}
    out["threads"] = after["threads"]
    return out

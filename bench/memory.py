"""Memory: peak RSS of the server and of a fresh client process while streaming a big result."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import ROOT, Config, GradtapServer, Section, proc_status, reset_peak_rss, thread_env
from .models import export_repeat

SERVER_FACTOR = 1.25
CLIENT_FACTOR = 1.1
WARMUP_BYTES = 4 << 20


@dataclass(frozen=True)
class Peak:
    """One big call's memory: rises of peak RSS over the pre-call RSS, in bytes."""

    result_bytes: int
    server_rise: int
    server_baseline: int
    server_peak_reset: bool
    client_rise: int
    client_baseline: int
    client: dict[str, Any]


def measure(repository: Path, size: int, threads: int, timeout: float = 600) -> Peak:
    """Serves `repository` (holding repeat models of `size` and WARMUP_BYTES) in a fresh server
    and fetches the big one from a fresh client process.

    Both sides are measured alike: the baseline is VmRSS after a small warm-up call, the peak
    is VmHWM after the big call, VmHWM having been reset to the current RSS just before it
    (/proc/PID/clear_refs) so that start-up peaks do not count. (The client cannot use
    ru_maxrss: see bench/_memory_client.py.)
    """
    from .models import repeat_name

    server = GradtapServer(threads, repository, builtins=False)
    try:
        warmup = repeat_name(WARMUP_BYTES)
        big = repeat_name(size)
        # Warm the server on the small model from a throwaway client, then measure.
        subprocess.run(
            [sys.executable, "-m", "bench._memory_client", server.address, warmup],
            env=thread_env(threads),
            cwd=ROOT,
            capture_output=True,
            timeout=timeout,
            check=True,
        )
        baseline = proc_status(server.pid)["VmRSS"]
        reset = reset_peak_rss(server.pid)
        done = subprocess.run(
            [sys.executable, "-m", "bench._memory_client", server.address, big, warmup],
            env=thread_env(threads),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the memory client failed:\n{done.stderr[-3000:]}")
        peak = proc_status(server.pid)["VmHWM"]
    finally:
        server.stop()
    client = json.loads(done.stdout.strip().splitlines()[-1])
    if not client["ok"] or client["result_bytes"] != size:
        raise AssertionError(f"the client received the wrong result: {client}")
    return Peak(
        result_bytes=size,
        server_rise=peak - baseline,
        server_baseline=baseline,
        server_peak_reset=reset,
        client_rise=client["rise"],
        client_baseline=client["rss_before"],
        client=client,
    )


def prepare(directory: Path, size: int) -> None:
    export_repeat(directory, size)
    export_repeat(directory, WARMUP_BYTES)


def run(cfg: Config) -> Section:
    section = Section("memory")
    size = cfg.memory_bytes
    server_rises, client_rises = [], []
    with tempfile.TemporaryDirectory(prefix="gradtap-bench-memory-") as tmp:
        prepare(Path(tmp), size)
        # Each repeat is a fresh server and client: peaks only ever go up within a process.
        peaks = [measure(Path(tmp), size, cfg.threads) for _ in range(min(cfg.repeats, 3))]
    for p in peaks:
        server_rises.append(p.server_rise / size)
        client_rises.append(p.client_rise / size)
    mib = size / 2**20
    section.row(
        f"server: peak RSS rise during a {mib:.0f} MiB result / result size",
        "x",
        server_rises,
        rise_mib=[p.server_rise / 2**20 for p in peaks],
        baseline_rss_mib=[p.server_baseline / 2**20 for p in peaks],
        peak_reset=all(p.server_peak_reset for p in peaks),
    )
    section.row(
        f"client (fresh process): peak RSS rise during a {mib:.0f} MiB result / result size",
        "x",
        client_rises,
        rise_mib=[p.client_rise / 2**20 for p in peaks],
        baseline_rss_mib=[p.client_baseline / 2**20 for p in peaks],
        ru_maxrss_rise_mib=[
            (p.client["ru_maxrss_after"] - p.client["ru_maxrss_before"]) / 2**20 for p in peaks
        ],
        ru_maxrss_before_mib=[p.client["ru_maxrss_before"] / 2**20 for p in peaks],
    )
    s = max(server_rises)
    c = max(client_rises)
    section.target(
        "server peak rise / result (worst run)", f"<= {SERVER_FACTOR}x", s, s <= SERVER_FACTOR, "x"
    )
    section.target(
        "client peak rise / result (worst run)", f"<= {CLIENT_FACTOR}x", c, c <= CLIENT_FACTOR, "x"
    )
    section.notes.append(
        f"A {mib:.0f} MiB float32 result (`x.repeat`, outputs only), each run in a fresh "
        "server and a fresh client process after a 4 MiB warm-up call. Server: VmHWM after "
        "the call (reset to VmRSS just before it) minus that VmRSS; the client the same, from "
        "its own /proc/self/status (ru_maxrss is inherited across exec from the spawning "
        "process, so it cannot show a child's rise; it is kept in the JSON)."
    )
    return section

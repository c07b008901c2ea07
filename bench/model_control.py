"""Models that come and go, measured: a default version replaced under concurrent callers,
and the server's memory over many upload, call and unload cycles.

    python bench/model_control.py [--callers 16] [--seconds 3] [--cycles 100]

Starts `gradtap serve --no-builtins --model-control --model-control-insecure` as a
subprocess. Phase 1: `--callers` threads call a model (Scale: y = relu(x * k), 1 MiB of
weights) while version 2 (k=2) is uploaded over version 1 (k=1); every result is checked
against the k of the version its metadata names. Phase 2: `--cycles` times, upload a version,
call it and unload it; the server's RSS before and after (after 10 warm-up cycles). Not part
of `make bench`: prints its figures, and exits 1 if a call failed or a result had another
version's numbers.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, `python bench/model_control.py`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gradtap.client import Client, GradtapError, Objective  # noqa: E402

from bench._common import GradtapServer, proc_status  # noqa: E402

WIDTH = 1 << 18
"""Weights (and input columns) of the model: 1 MiB of float32."""


class Scale(torch.nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((WIDTH,), k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * self.w)


def archive(k: float) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Scale(k), (torch.ones(2, WIDTH),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] * 1e3 if ordered else float("nan")


def replace_under_load(
    address: str, archives: dict[int, bytes], callers: int, seconds: float
) -> bool:
    with Client(address, timeout=60) as admin:
        admin.load_model("m", archives[1], version="1")
    stop = threading.Event()
    latencies: dict[str, list[float]] = {"before": [], "after": []}
    phase = ["before"]
    counts: dict[str, int] = {}
    failures: list[str] = []

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(address, timeout=60) as c:
            while not stop.is_set():
                x = rng.standard_normal((1, WIDTH)).astype(np.float32)
                started = time.perf_counter()
                try:
                    r = c.analyze("m", x, [], Objective.sum())
                except GradtapError as e:
                    failures.append(f"{e.code.name}: {e.message}")
                    continue
                version = r.metadata["model_version"]
                if not np.allclose(r.outputs[0], np.maximum(x * float(version), 0)):
                    failures.append(f"version {version} gave another version's numbers")
                latencies[phase[0]].append(time.perf_counter() - started)
                counts[version] = counts.get(version, 0) + 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    with Client(address, timeout=60) as admin:
        started = time.perf_counter()
        admin.load_model("m", archives[2], version="2")
        loaded = time.perf_counter() - started
    phase[0] = "after"
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    print(
        f"replace under {callers} callers: {sum(counts.values())} calls "
        f"(version 1: {counts.get('1', 0)}, version 2: {counts.get('2', 0)}), "
        f"{len(failures)} failed; upload and load of version 2 took {loaded * 1e3:.0f} ms; "
        f"latency p50/p99 before {quantile(latencies['before'], 0.5):.1f}/"
        f"{quantile(latencies['before'], 0.99):.1f} ms, after "
        f"{quantile(latencies['after'], 0.5):.1f}/{quantile(latencies['after'], 0.99):.1f} ms"
    )
    for failure in failures[:5]:
        print("  ", failure)
    return not failures


def churn(server: GradtapServer, archives: dict[int, bytes], cycles: int) -> None:
    x = np.ones((1, WIDTH), np.float32)
    with Client(server.address, timeout=60) as admin:
        admin.unload_model("m")

        def cycle(i: int) -> None:
            admin.load_model("m", archives[1 + i % 2], version="3")
            admin.analyze("m", x, [], Objective.sum(), version="3")
            admin.unload_model("m", "3")

        for i in range(10):
            cycle(i)
        before = proc_status(server.pid)["VmRSS"]
        started = time.perf_counter()
        for i in range(cycles):
            cycle(i)
        seconds = time.perf_counter() - started
        after = proc_status(server.pid)["VmRSS"]
    print(
        f"churn: {cycles} upload/call/unload cycles of a 1 MiB-weight version in {seconds:.1f} s "
        f"({seconds / cycles * 1e3:.0f} ms each); server RSS {before / 2**20:.1f} -> "
        f"{after / 2**20:.1f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=16, metavar="N")
    parser.add_argument("--seconds", type=float, default=3.0, metavar="S")
    parser.add_argument("--cycles", type=int, default=100, metavar="N")
    args = parser.parse_args(argv)
    archives = {k: archive(float(k)) for k in (1, 2)}
    flags = ["--model-control", "--model-control-insecure", "--max-upload-bytes", str(64 << 20)]
    server = GradtapServer(threads=1, builtins=False, extra=flags)
    try:
        ok = replace_under_load(server.address, archives, args.callers, args.seconds)
        churn(server, archives, args.cycles)
    finally:
        server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

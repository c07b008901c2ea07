"""The soak's heavy-valid phase: issue 11's probes, all at once, against a default server.

Valid but heavy calls (batch 4096 analyses, smoothgrad and integrated gradients with
unbounded internal batches, an aggregate-only AnalyzeMany, a long integration), slow readers
(16 callers that read one message of a 72 MiB result and stall) and 1,000 unread streams on
one channel run concurrently, while one normal caller keeps sending a small request and a
sampler reads the server's resident memory. Reported: what became of every probe, the
server's peak RSS against its memory budget, and how long the normal caller waited.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from gradtap.client import Client, GradtapError, Objective

from gradtap.v1 import gradtap_pb2 as pb

ANALYZE = "/gradtap.v1.GradientService/Analyze"

STREAM_PROBES = (5, 6)
"""The probes of many raw streams (the slow readers, the unread streams)."""

PROBES = [
    (
        "3 concurrent `seed-convnet` calls, batch 4096, input gradient only",
        "server RSS reached 6.5 GiB in 35 s and was killed",
    ),
    (
        "one `smoothgrad` on `seed-mlp`, batch 4096, `nt_samples=1024`, "
        "`nt_samples_batch_size=1024`",
        "killed at 6.5 GiB after 12 s",
    ),
    (
        "one `integrated_gradients` on `seed-mlp`, batch 512, `n_steps=4096`, "
        "`internal_batch_size=10**9`",
        "killed at 6.5 GiB after 94 s",
    ),
    (
        "one `analyze_many`, `aggregate=True, per_item=False`, 4 targets, 3 items of batch 4096",
        "one stream peaked at 6.3 GiB while sending nothing per item",
    ),
    (
        "`integrated_gradients` on `seed-convnet`, batch 256, `n_steps=4096`",
        "ran 120 s until the client's deadline; 618 s with none",
    ),
    (
        "16 clients start `Analyze` for a 72 MiB result, read one message, stop",
        "every other caller got DEADLINE_EXCEEDED for 620 s; 1.9 GiB stayed held",
    ),
    (
        "1,000 streams on one channel, 9 MiB results, never read, 60 s deadline",
        "normal callers refused until the streams were cancelled",
    ),
]
"""(what was sent, what happened before) for each probe, in the issue's words."""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _outcome(run: Callable[[], object]) -> tuple[str, float]:
    started = time.monotonic()
    try:
        run()
        kind = "OK"
    except GradtapError as e:
        kind = f"{e.code.name} {e.reason}".strip()
    except grpc.RpcError as e:
        kind = e.code().name
    return kind, time.monotonic() - started


def _tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(array.shape), data=array.tobytes())


def _stalled_streams(
    address: str, count: int, rows: int, read: int, stall: float, deadline: float | None
) -> Counter[str]:
    """`count` Analyze streams of a relu_1 activation (rows x 144 KiB) on one channel, each
    read for `read` messages, then left unread for `stall` seconds, then cancelled."""
    x = np.random.default_rng(0).standard_normal((rows, 3, 28, 28), dtype=np.float32)
    request = pb.AnalyzeRequest(
        model=pb.Model(name="seed-convnet"),
        inputs=[_tensor(x)],
        targets=[pb.TargetLayer(name="relu_1", capture=pb.CAPTURE_ACTIVATION)],
    )
    ends: Counter[str] = Counter()
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as ch:
        call = ch.unary_stream(
            ANALYZE,
            request_serializer=pb.AnalyzeRequest.SerializeToString,
            response_deserializer=pb.AnalyzeResponse.FromString,
        )
        streams = [call(request, timeout=deadline) for _ in range(count)]
        for stream in streams:
            try:
                for _ in range(read):
                    next(stream)
            except (grpc.RpcError, StopIteration):
                pass
        time.sleep(stall)
        for stream in streams:
            code = stream.code() if stream.done() else None
            ends[code.name if code is not None else "still open, cancelled"] += 1
            stream.cancel()
    return ends


def heavy_phase(address: str, pid: int, budget: int, seconds: float) -> dict[str, Any]:
    """Runs every probe at once for at most about `seconds`; returns the figures."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4096, 3, 28, 28), dtype=np.float32)
    flat = rng.standard_normal((4096, 784), dtype=np.float32)
    small = rng.standard_normal((2, 784), dtype=np.float32)
    outcomes: dict[int, Counter[str]] = {i: Counter() for i in range(len(PROBES))}
    longest: dict[int, float] = {i: 0.0 for i in range(len(PROBES))}
    done = threading.Event()
    peak = [_rss(pid)]
    waits: list[float] = []
    failures: Counter[str] = Counter()
    client = Client(address)

    def record(i: int, run: Callable[[], object]) -> None:
        kind, took = _outcome(run)
        if i not in STREAM_PROBES:  # those count how each of their streams ended themselves
            outcomes[i][kind] += 1
        longest[i] = max(longest[i], took)

    calls: list[tuple[int, Callable[[], object]]] = [
        (
            0,
            lambda: client.analyze(
                "seed-convnet", images, objective=Objective.sum(), input_grads=True,
                outputs=False, timeout=seconds,
            ),
        ),
    ] * 3 + [
        (
            1,
            lambda: client.attribute(
                "seed-mlp", flat, "smoothgrad", index=1, nt_samples=1024,
                nt_samples_batch_size=1024, timeout=seconds,
            ),
        ),
        (
            2,
            lambda: client.attribute(
                "seed-mlp", flat[:512], "integrated_gradients", index=1, n_steps=4096,
                internal_batch_size=10**9, timeout=seconds,
            ),
        ),
        (
            3,
            lambda: list(
                client.analyze_many(
                    "seed-convnet", [images] * 3, ["conv1", "relu", "conv2", "relu_1"],
                    Objective.sum(), outputs=False, aggregate=True, per_item=False,
                    timeout=seconds,
                )
            ),
        ),
        (
            4,
            lambda: client.attribute(
                "seed-convnet", images[:256], "integrated_gradients", index=1, n_steps=4096,
                timeout=seconds,
            ),
        ),
        (5, lambda: outcomes[5].update(_stalled_streams(address, 16, 512, 1, seconds, None))),
        (6, lambda: outcomes[6].update(_stalled_streams(address, 1000, 64, 0, seconds, 60.0))),
    ]  # fmt: skip

    def sampler() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _rss(pid))

    def normal_caller() -> None:
        while not done.is_set():
            kind, took = _outcome(
                lambda: client.analyze("seed-mlp", small, ["fc2"], Objective.sum(), timeout=30)
            )
            waits.append(took)
            if kind != "OK":
                failures[kind] += 1

    threads = [threading.Thread(target=sampler), threading.Thread(target=normal_caller)]
    probes = [threading.Thread(target=record, args=call) for call in calls]
    started = time.monotonic()
    for t in threads + probes:
        t.start()
    for t in probes:
        t.join(seconds * 3 + 120)
    done.set()
    for t in threads:
        t.join(60)
    client.close()
    ordered = sorted(waits)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "budget_bytes": budget,
        "peak_rss_bytes": peak[0],
        "probes": [
            {
                "what": what,
                "before": before,
                "outcomes": dict(outcomes[i]),
                "longest_seconds": round(longest[i], 1),
            }
            for i, (what, before) in enumerate(PROBES)
        ],
        "normal_calls": len(waits),
        "normal_failures": dict(failures),
        "normal_wait_p50_s": round(ordered[len(ordered) // 2], 3) if ordered else None,
        "normal_wait_max_s": round(ordered[-1], 3) if ordered else None,
    }


def after_text(probe: dict[str, Any]) -> str:
    """A probe's outcome in words: `RESOURCE_EXHAUSTED MEMORY_BUDGET x3`, and its longest."""
    parts = [f"{kind} x{n}" if n > 1 else kind for kind, n in sorted(probe["outcomes"].items())]
    return f"{', '.join(parts) or 'nothing'} (longest {probe['longest_seconds']:g} s)"


def _mib(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"


def table(h: dict[str, Any] | None) -> str:
    """Every probe of issue 11 with what happened before and in this run."""
    lines = ["| what was sent (default settings) | before | this run |", "|---|---|---|"]
    for probe in h["probes"] if h else []:
        lines.append(f"| {probe['what']} | {probe['before']} | {after_text(probe)} |")
    for what, before, after in ARCHIVE_AND_SHM_PROBES:
        lines.append(f"| {what} | {before} | {after} |")
    if h:
        waits = f"median {h['normal_wait_p50_s']} s, longest {h['normal_wait_max_s']} s"
        lines += [
            "",
            "| figure | value |",
            "|---|---|",
            f"| phase wall time | {h['seconds']} s |",
            f"| server peak RSS / memory budget | {_mib(h['peak_rss_bytes'])} / "
            f"{_mib(h['budget_bytes'])} |",
            f"| server RSS before / settled after | {_mib(h['rss_before_bytes'])} / "
            f"{_mib(h['rss_settled_bytes'])} |",
            f"| a normal caller meanwhile | {h['normal_calls']} calls, {waits}; failures: "
            f"{h['normal_failures'] or 'none'} |",
        ]
    return "\n".join(lines)


ARCHIVE_AND_SHM_PROBES = [
    (
        "a model repository holding one archive with a bad CRC, invalid JSON, or a wrongly "
        "typed JSON member",
        "`gradtap serve` exits 1 or 2",
        "each shows FAILED with a reason naming the member; the others and the built-in models "
        "serve (`tests/server/models/test_repository_limits.py`)",
    ),
    (
        "a 2.5 MB zip bomb (a 2 GiB member of zeros) in the repository",
        "start-up passes 6.5 GiB and never reaches SERVING",
        "refused from its zip directory before a byte is unpacked (FAILED); with the bad CRC "
        "and the sparse file below in one repository, start-up took 0.9 s and 445 MiB against "
        "49 s and 5.5 GiB before (same test file)",
    ),
    (
        "a `.pt2` symlink to a 5 GiB sparse file",
        "read whole at start-up: 27 s and a 5.5 GiB peak",
        "refused from its size, unread (`--max-archive-bytes`, 8 GiB); a link leaving the "
        "repository is refused (same test file)",
    ),
    (
        "`--shared-memory`: a region whose first 16 bytes are zero, 16 zero token bytes sent",
        "accepted",
        "refused: the token must be all 32 bytes, with at least 8 distinct values "
        "(`tests/server/wire/test_shared_memory.py`)",
    ),
    (
        "`--shared-memory`: a region made 0644 by its owner",
        "another local user can have the server write into it",
        "refused, with the same message as every other unusable region, nothing written "
        "(same test file)",
    ),
]
"""The issue's probes that are not traffic: each has its own test."""

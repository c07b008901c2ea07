"""Where a small call's time goes: marks at each stage of one Analyze call, on both sides.

`python -m bench._stages serve [serve flags...]` runs `gradtap serve` with a mark (a
CLOCK_MONOTONIC timestamp, which both processes share) at each stage of the server's path, and
writes them to $GRADTAP_STAGES_OUT when it stops. `python -m bench._stages call ADDRESS N OUT`
makes N seed-mlp calls with marks on the client's path. `stages(server, client)` lines them
up call by call: the median of each step from one mark to the next.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

Marks = list[tuple[str, int]]
MARKS: Marks = []

STEPS = {
    "client: build the request": ("c0", "c1"),
    "client: start the call (grpc), loopback, the server's poller picks it up": ("c1", "s0"),
    "server: interceptors (poller thread)": ("s0", "s1"),
    "server: hand-off to a serving thread": ("s1", "s2"),
    "server: admission, to the servicer": ("s2", "s3"),
    "server: request parsing and checks (wire)": ("s3", "s4"),
    "server: the engine (hand-off to the compute thread, plan lookup, compute)": ("s4", "s5"),
    "server: result framing": ("s5", "s6"),
    "server: the message to grpc, loopback, to the client": ("s6", "c3"),
    "server: status (observability, then grpc) and client: assembling the result": ("c3", "c4"),
}
"""Each reported step: from one mark to the next (see `serve` and `call`)."""


def mark(name: str) -> None:
    MARKS.append((name, time.perf_counter_ns()))


def _wrap(owner: Any, attr: str, before: str | None = None, after: str | None = None) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        result = fn(*args, **kwargs)
        if after:
            mark(after)
        return result

    setattr(owner, attr, wrapped)


def serve(flags: list[str]) -> None:
    from gradtap.server.engine import batching
    from gradtap.server.rpc import handlers, observability
    from gradtap.server.wire import requests

    _wrap(observability.Observability, "intercept_service", before="s0", after="s1")
    _wrap(observability.Observability, "_begin", before="s2")
    _wrap(requests, "model", before="s3")
    _wrap(requests, "analyze", after="s4")
    _wrap(batching.Batcher, "analyze", after="s5")
    serialize = handlers.serialize

    def marked(message: object) -> bytes:
        mark("s6")
        return serialize(message)

    handlers.serialize = marked
    out = os.environ["GRADTAP_STAGES_OUT"]
    try:
        from gradtap.cli import main

        sys.argv = ["gradtap", "serve", *flags]
        main()
    finally:
        with open(out, "w") as f:
            json.dump(MARKS, f)


def call(address: str, calls: int, out: str) -> None:
    import dataclasses

    import numpy as np
    from gradtap.client import Client, Objective, _assemble, _calls, _channel

    invoke = _channel.Connection._invoke

    def invoked(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark("c1")
        return invoke(self, *args, **kwargs)

    _channel.Connection._invoke = invoked  # type: ignore[method-assign]
    decode = _assemble.decode_response

    def decoded(data: bytes) -> Any:
        mark("c3")
        return decode(data)

    _calls.ANALYZE = dataclasses.replace(_calls.ANALYZE, deserialize=decoded)
    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    with Client(address, timeout=60) as client:
        for _ in range(200):
            client.analyze("seed-mlp", x, ["relu_1"], Objective.sum())
        MARKS.clear()
        for _ in range(calls):
            mark("c0")
            client.analyze("seed-mlp", x, ["relu_1"], Objective.sum())
            mark("c4")
    with open(out, "w") as f:
        json.dump(MARKS, f)


def _calls_of(marks: Marks) -> Iterator[dict[str, int]]:
    current: dict[str, int] | None = None
    for name, t in sorted(marks, key=lambda m: m[1]):
        if name == "c0":
            current = {}
        if current is not None and name not in current:
            current[name] = t
        if current is not None and name == "c4":
            yield current
            current = None


def stages(server: Marks, client: Marks) -> dict[str, float]:
    """Median microseconds of each step of STEPS, over the calls that have every mark."""
    steps: dict[str, list[float]] = {name: [] for name in STEPS}
    steps["total"] = []
    for marks in _calls_of(server + client):
        if not all(m in marks for pair in STEPS.values() for m in pair):
            continue
        for name, (a, b) in STEPS.items():
            steps[name].append((marks[b] - marks[a]) / 1e3)
        steps["total"].append((marks["c4"] - marks["c0"]) / 1e3)
    return {k: statistics.median(v) if v else float("nan") for k, v in steps.items()} | {
        "calls": float(len(steps["total"]))
    }


def main() -> None:
    command = sys.argv[1]
    handlers: dict[str, Callable[[], None]] = {
        "serve": lambda: serve(sys.argv[2:]),
        "call": lambda: call(sys.argv[2], int(sys.argv[3]), sys.argv[4]),
    }
    handlers[command]()


if __name__ == "__main__":
    main()

"""One load-generating client process for the batching benchmark.

Run as `python -m bench._load_worker`. Reads one JSON command per line on stdin, sends batch-1
requests from `start_at` (wall clock) for `seconds`, and answers one JSON line on stdout. Imports
no torch: it is a thin client like a user's.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from gradtap.client import Client, GradtapError, Objective


def _load(command: dict[str, Any], clients: dict[str, Client]) -> dict[str, Any]:
    address = command["address"]
    if address not in clients:
        clients[address] = Client(address, timeout=60)
    client = clients[address]
    rng = np.random.default_rng(command.get("seed", 0))
    x = rng.standard_normal(command["shape"]).astype(np.float32)
    objective = Objective.sum()

    def call() -> None:
        client.analyze(command["model"], x, command["targets"], objective, outputs=False)

    call()  # the connection is up before the clock starts
    while time.time() < command["start_at"]:
        time.sleep(min(0.001, max(0.0, command["start_at"] - time.time())))
    stop = command["start_at"] + command["seconds"]
    latencies: list[float] = []
    errors = 0
    last_error = ""
    while time.time() < stop and len(latencies) + errors < command["max_calls"]:
        t0 = time.perf_counter()
        try:
            call()
        except GradtapError as e:
            errors += 1
            last_error = f"{e.code.name}: {e.message}"
            continue
        latencies.append(time.perf_counter() - t0)
    return {
        "calls": len(latencies),
        "errors": errors,
        "last_error": last_error,
        "end": time.time(),
        "latencies": latencies,
    }


def main() -> None:
    clients: dict[str, Client] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(_load(json.loads(line), clients)), flush=True)
    for client in clients.values():
        client.close()


if __name__ == "__main__":
    main()

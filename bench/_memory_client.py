"""A fresh client process that fetches one big result and reports its own peak RSS.

Run as `python -m bench._memory_client ADDRESS MODEL [WARMUP_MODEL]`; prints one JSON line.
Imports only the thin client (no torch), so its baseline is what a user's process would have.

The peak is VmHWM of /proc/self/status, reset to the current RSS just before the call. Not
ru_maxrss: Linux carries a process's ru_maxrss across execve from the process that spawned
it, so a child of the benchmark (which holds torch and big buffers) starts with the parent's
peak, and a 1 GiB rise can read as 0. ru_maxrss is still reported, for reference.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
from gradtap.client import Client


def _peak() -> int:
    """ru_maxrss in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status(key: str) -> int:
    """A Vm* value of /proc/self/status in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def main() -> None:
    address, model = sys.argv[1], sys.argv[2]
    warmup = sys.argv[3] if len(sys.argv) > 3 else None
    times = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    x = np.ones((1, 1024), dtype=np.float32)
    with Client(address, timeout=600) as client:
        # Connect and run every code path once on a small result, so one-off costs (lazy
        # imports, channel buffers) are not counted as the big result's.
        if warmup is not None:
            client.analyze(warmup, x, outputs=True)
        else:
            client.list_models()
        reset = _reset_peak()
        rss_before = _status("VmRSS")
        maxrss_before = _peak()
        for _ in range(times - 1):  # earlier fetches, each dropped before the next
            client.analyze(model, x, outputs=True)
        result = client.analyze(model, x, outputs=True)
        hwm_after = _status("VmHWM")
        maxrss_after = _peak()
        out = result.outputs[0]
        print(
            json.dumps(
                {
                    "rss_before": rss_before,
                    "hwm_after": hwm_after,
                    "hwm_reset": reset,
                    "rise": hwm_after - rss_before,
                    "ru_maxrss_before": maxrss_before,
                    "ru_maxrss_after": maxrss_after,
                    "rss_after": _status("VmRSS"),
                    "result_bytes": int(out.nbytes),
                    "server_total_ms": result.metadata["timings"]["total_ms"],
                    "ok": bool(out.shape[1] == 1024 and np.array_equal(out[-1], x[0])),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

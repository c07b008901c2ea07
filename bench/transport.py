"""Transport: a 256 MiB result through gradtap vs a plain TCP socket and vs np.copy."""

from __future__ import annotations

import re
import resource
import socket
import struct
import sys
from typing import Any

import numpy as np

from ._common import GB, Child, Config, Section, interleaved, ratios, stats, thread_env
from .models import REPEAT_WIDTH, repeat_name

TARGET_GBPS = 2.5
TARGET_SOCKET_RATIO = 0.8
TARGET_SHM_GBPS = 5.0


class SocketClient:
    """Receives N bytes from bench._socket_server into a numpy buffer with recv_into."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def fetch(self, size: int, into: np.ndarray | None = None) -> np.ndarray:
        buffer = np.empty(size, dtype=np.uint8) if into is None else into
        view = buffer.data
        self.sock.sendall(struct.pack("<Q", size))
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if n == 0:
                raise ConnectionError("the socket server closed the connection")
            got += n
        return buffer

    def close(self) -> None:
        self.sock.close()


def shm_available() -> bool:
    from gradtap.client._shm import DIRECTORY

    return DIRECTORY.is_dir()


def socket_server(max_bytes: int, threads: int) -> Child:
    return Child(
        [sys.executable, "-m", "bench._socket_server", str(max_bytes)],
        re.compile(r"socket serving on (\S+:\d+)"),
        thread_env(threads),
        timeout=60,
    )


def run(cfg: Config, address: str) -> Section:
    from gradtap.client import Client, SharedRegion

    section = Section("transport")
    size = cfg.transport_bytes
    model = repeat_name(size)
    x = np.random.default_rng(0).standard_normal((1, REPEAT_WIDTH)).astype(np.float32)
    peer = socket_server(size, cfg.threads)
    sock = SocketClient(peer.match.group(1))
    source = np.ones(size, dtype=np.uint8)
    reused = np.empty(size, dtype=np.uint8)
    server_ms: dict[str, list[float]] = {"gradtap": [], "shm_reused": [], "shm_fresh": []}
    faults: dict[str, list[int]] = {key: [] for key in server_ms}
    """The client's minor page faults per call: a fresh 256 MiB array faults 65,536 small
    pages, or 128 huge ones when the kernel has them to give."""
    last: dict[str, Any] = {}
    region = SharedRegion(size + 4096) if shm_available() else None
    try:
        with Client(address, timeout=600) as client:

            def call(key: str, shared_memory: Any = False) -> None:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                r = client.analyze(model, x, outputs=True, shared_memory=shared_memory)
                faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
                server_ms[key].append(r.metadata["timings"]["total_ms"])
                last["r"] = r

            variants = {"gradtap": lambda: call("gradtap")}
            if region is not None:
                variants["shm_reused"] = lambda: call("shm_reused", region)
                variants["shm_fresh"] = lambda: call("shm_fresh", True)
            for key, fn in variants.items():
                fn()
                r = last.pop("r")
                out = r.outputs[0]
                if out.nbytes != size or not np.array_equal(out[-1], x[0]):
                    raise AssertionError(f"gradtap ({key}) returned the wrong result")
                if key != "gradtap" and r.metadata["transport"] != "shared_memory":
                    raise AssertionError("the server did not write into shared memory")
                del out, r
            series = interleaved(
                {
                    **variants,
                    "socket_fresh": lambda: sock.fetch(size),
                    "socket_reused": lambda: sock.fetch(size, reused),
                    "np_copy": lambda: np.copy(source),
                },
                rounds=cfg.repeats,
                budget_s=cfg.budget_s,
                # HTTP/2 flow-control windows grow over the first large transfers (BDP
                # probing); a fresh channel needs about three before it runs at speed.
                warmup=3,
            )
            last.clear()
    finally:
        sock.close()
        peer.stop()
        if region is not None:
            region.close()
    gbps = {k: [size / t / GB for t in v] for k, v in series.items()}
    # The baseline, as the issue defines it: recv_into a buffer allocated beforehand.
    base = series["socket_reused"]
    base_name = "socket (preallocated buffer)"
    # throughput ratio = baseline time / our time, round by round
    to_socket = ratios(base, series["gradtap"])
    section.row(
        "gradtap analyze, outputs only, array assembled in the client",
        "GB/s",
        gbps["gradtap"],
        ratio=to_socket,
        ratio_to=base_name,
        ratio_to_socket_fresh_buffer=stats(ratios(series["socket_fresh"], series["gradtap"])),
        ratio_to_np_copy=stats(ratios(series["np_copy"], series["gradtap"])),
    )
    timed_server_ms = server_ms["gradtap"][-len(series["gradtap"]) :]
    section.row("gradtap server's compute time (timings.total_ms)", "ms", timed_server_ms)
    transport_s = [t - ms / 1e3 for t, ms in zip(series["gradtap"], timed_server_ms)]
    section.row(
        "gradtap transport only (end to end minus server compute)",
        "GB/s",
        [size / t / GB for t in transport_s if t > 0],
        ratio=ratios(base, transport_s),
        ratio_to=base_name,
    )
    shm_transport: dict[str, list[float]] = {}
    for key, text in (
        ("shm_reused", "a SharedRegion reused across calls"),
        ("shm_fresh", "a fresh region per call (shared_memory=True)"),
    ):
        if key not in series:
            section.unavailable(f"shared memory, {text}", "this host has no /dev/shm")
            continue
        section.row(
            f"shared memory, {text}: end to end",
            "GB/s",
            gbps[key],
            ratio=ratios(base, series[key]),
            ratio_to=base_name,
        )
        ms = server_ms[key][-len(series[key]) :]
        shm_transport[key] = [t - m / 1e3 for t, m in zip(series[key], ms)]
        section.row(
            f"shared memory, {text}: transport only (end to end minus server compute)",
            "GB/s",
            [size / t / GB for t in shm_transport[key] if t > 0],
            ratio=ratios(base, shm_transport[key]),
            ratio_to=base_name,
        )
    for key, text in (
        ("socket_reused", "plain TCP socket, recv_into a preallocated buffer (baseline)"),
        ("socket_fresh", "plain TCP socket, recv_into a fresh np.empty per transfer"),
        ("np_copy", "np.copy of the same size (memory bandwidth reference)"),
    ):
        section.row(text, "GB/s", gbps[key], ratio=ratios(base, series[key]), ratio_to=base_name)
    section.info.update(result_bytes=size, model=model)
    # The targets hold "in every run": the worst round is the measured figure.
    g = stats(gbps["gradtap"])["min"]
    r = stats(to_socket)["min"]
    rounds = len(series["gradtap"])
    per_round = list(zip(gbps["gradtap"], faults["gradtap"][-rounds:]))
    section.info["gradtap_rounds"] = [
        {"gb_per_s": round(gb, 3), "client_minor_faults": f} for gb, f in per_round
    ]
    section.info["transparent_hugepages"] = _thp()
    section.target(
        "gradtap end-to-end throughput (worst round)",
        f">= {TARGET_GBPS} GB/s",
        g,
        g >= TARGET_GBPS,
        "GB/s",
    )
    section.target(
        "gradtap / plain socket (preallocated buffer), worst round",
        f">= {TARGET_SOCKET_RATIO}x",
        r,
        r >= TARGET_SOCKET_RATIO,
        "x",
    )
    if "shm_reused" in shm_transport:
        s = stats([size / t / GB for t in shm_transport["shm_reused"] if t > 0])["median"]
        section.target(
            "shared memory (reused region), transport only",
            f">= {TARGET_SHM_GBPS:g} GB/s",
            s,
            s >= TARGET_SHM_GBPS,
            "GB/s",
        )
    section.notes.append(
        f"{size / 2**20:.0f} MiB float32 result of `x.repeat({size // (4 * REPEAT_WIDTH)}, 1)`; "
        "the server's compute (making the tensor) is inside the end-to-end time and shown on "
        "its own row. The socket baseline receives into a buffer allocated once, before "
        "timing; gradtap's client must allocate a fresh array per result (the caller keeps "
        "it), so the fresh-np.empty socket row shows what that page-faulting alone costs. "
        "Shared memory (`gradtap serve --shared-memory`, docs/shared-memory.md): the server "
        "pwrite()s the result into a region the client made in /dev/shm, and the client's "
        "arrays are views of it; a fresh region per call pays for allocating its pages. "
        "The targets are judged on the worst round (the issue asks for them in every run); "
        "the JSON lists each round's throughput beside the client's page faults for it. "
        "GB = 1e9 bytes."
    )
    return section


def _thp() -> str:
    """The kernel's transparent huge page setting (`always [madvise] never`), or ""."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return ""

"""Servers for the fault tests: `gradtap serve` subprocesses on port 0, stopped by signals or
killed -9, and what in-process servers report on their metrics port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from gradtap.server.rpc.app import Running
from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(r"gradtap serving (\d+) model\(s\) on (\S+):(\d+)")
START_SECONDS = 120


class ServerProcess:
    """One `gradtap serve --port 0` child; `ready()` waits for its "serving" line."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADTAP_")}
        # Replicas share the machine: one torch thread each keeps them from fighting.
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradtap.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.port = 0
        self.stderr: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = READY.search(line)
            if match and not self._ready.is_set():
                self.port = int(match.group(3))
                self._ready.set()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def ready(self, timeout: float = START_SECONDS) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"gradtap serve did not start:\n{self.log()}")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return "".join(self.stderr[-60:])

    def terminate(self) -> None:
        """SIGTERM: the server drains."""
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, mid-call if it must."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)


@contextmanager
def servers(arguments: Iterable[Iterable[str]]) -> Iterator[list[ServerProcess]]:
    """Starts one server per argument list, all at once, and kills whatever is left after."""
    with ExitStack() as stack:
        started = []
        for args in arguments:
            server = ServerProcess(*args)
            stack.callback(server.kill)
            started.append(server)
        yield [server.ready() for server in started]


class Repeat(torch.nn.Module):
    """(1, 4096) -> (4096, 4096) float32: a 64 MiB output, 64 messages on the wire."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(4096, 1)


def big_result_repository(directory: Path) -> Path:
    """A model repository holding `big`, the Repeat module."""
    program = torch.export.export(Repeat(), (torch.zeros(1, 4096),))
    torch.export.save(program, directory / "big.pt2")
    return directory


def metric(running: Running, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, from the metrics port."""
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def eventually(condition: Callable[[], bool], seconds: float = 10) -> bool:
    """Polls `condition` for up to `seconds`; its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()

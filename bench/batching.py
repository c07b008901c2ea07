"""Batching: served throughput of 16 concurrent batch-1 clients, dynamic batching on vs off."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ._common import (
    Child,
    Config,
    GradtapServer,
    Section,
    quantile,
    ratios,
    serve_help,
    stats,
    thread_env,
    timed_calls,
)
from .models import ResBlock

TARGET_RATIO = 1.5
TARGET_CPU_MS = 1.0
"""The server's CPU time per served call under 16 concurrent clients."""
BATCH_ON = ["--max-batch-size", "16", "--batch-timeout-us", "2000"]
BATCH_OFF = ["--max-batch-size", "1"]
# Enough server threads and admission places that 16 concurrent calls can all reach the
# batcher.
WORKERS = ["--max-workers", "16", "--max-concurrent-requests", "16"]


class Workers:
    """N client processes (not threads: 16 threads would share one GIL)."""

    def __init__(self, n: int, threads: int) -> None:
        self.children = [
            Child(
                [sys.executable, "-m", "bench._load_worker"],
                re.compile(r'"ready"'),
                thread_env(threads),
                timeout=120,
                stdin=True,
                wait=False,
            )
            for _ in range(n)
        ]

    def ready(self) -> None:
        for child in self.children:
            child.ready()

    def load(
        self,
        server: GradtapServer,
        model: str,
        shape: tuple[int, ...],
        targets: list[str],
        seconds: float,
    ) -> dict[str, float]:
        address = server.address
        cpu_before = [cpu_seconds(server.pid), sum(cpu_seconds(c.pid) for c in self.children)]
        # by then every worker has its command, has connected and made one warm-up call
        start_at = time.time() + 0.25 + 0.05 * len(self.children)
        for i, child in enumerate(self.children):
            command = {
                "address": address,
                "model": model,
                "shape": list(shape),
                "targets": targets,
                "seconds": seconds,
                "start_at": start_at,
                "max_calls": 1_000_000,
                "seed": i,
            }
            assert child.process.stdin is not None
            child.process.stdin.write(json.dumps(command) + "\n")
            child.process.stdin.flush()
        answers = [json.loads(child.readline(seconds + 120)) for child in self.children]
        server_cpu = cpu_seconds(server.pid) - cpu_before[0]
        clients_cpu = sum(cpu_seconds(c.pid) for c in self.children) - cpu_before[1]
        calls = sum(a["calls"] for a in answers)
        errors = sum(a["errors"] for a in answers)
        elapsed = max(a["end"] for a in answers) - start_at
        latencies = [t for a in answers for t in a["latencies"]]
        if errors:
            last = next(a["last_error"] for a in answers if a["errors"])
            print(f"  note: {errors} failed calls to {model} ({last})", file=sys.stderr)
        return {
            "throughput": calls / elapsed,
            "calls": calls,
            "errors": errors,
            "p50_ms": quantile(latencies, 0.5) * 1e3,
            # CPU time per served call (the clients' includes one warm-up call each)
            "server_cpu_ms": server_cpu / max(calls, 1) * 1e3,
            "clients_cpu_ms": clients_cpu / max(calls, 1) * 1e3,
        }

    def stop(self) -> None:
        for child in self.children:
            child.stop()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _in_process(
    module: torch.nn.Module, forward: Callable[[torch.Tensor], Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One request's gradient at the target, the way gradtap computes it: autograd.grad."""
    for p in module.parameters():
        p.requires_grad_(False)

    def grad(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        logits, tap = forward(x)
        return torch.autograd.grad(logits.sum(), [tap])[0]

    return grad


def run(
    cfg: Config,
    repository: Path,
    resblock: ResBlock,
    convnet: torch.nn.Module,
) -> Section:
    section = Section("batching")
    help_text = serve_help()
    available = "--max-batch-size" in help_text and "--batch-timeout-us" in help_text
    cases: dict[str, tuple[tuple[int, ...], list[str], Callable[[torch.Tensor], torch.Tensor]]] = {
        "resblock": ((1, 3, 16, 16), ["conv1"], _in_process(resblock, resblock.captured)),
        # seed-convnet returns (logits, relu_1), the target
        "seed-convnet": ((1, 3, 28, 28), ["relu_1"], _in_process(convnet, convnet.__call__)),
    }
    # Per-sample in-process cost at batch 1 and 16 says which model batching can help.
    drop: dict[str, float] = {}
    for model, (shape, _, grad) in cases.items():
        per_sample = {}
        for batch in (1, 16):
            x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(0))
            times = timed_calls(partial(grad, x), 200 if batch == 1 else 30, cfg.budget_s / 4)
            per_sample[batch] = quantile(times[len(times) // 5 :], 0.5) / batch
        drop[model] = per_sample[16] / per_sample[1]
        section.row(
            f"{model}: in-process per-sample cost at batch 16 / at batch 1",
            "x",
            [drop[model]],
            per_sample_ms_batch1=per_sample[1] * 1e3,
            per_sample_ms_batch16=per_sample[16] * 1e3,
        )
    variants: dict[str, list[str]] = (
        {"on": BATCH_ON + WORKERS, "off": BATCH_OFF + WORKERS}
        if available
        else {"default": WORKERS}
    )
    servers: dict[str, GradtapServer] = {}
    workers: Workers | None = None
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    sequential: dict[str, list[float]] = {m: [] for m in cases}
    try:
        # Start the servers and the client processes side by side, then wait for all.
        for name, flags in variants.items():
            servers[name] = GradtapServer(cfg.threads, repository, extra=flags, wait=False)
        workers = Workers(cfg.batch_clients, 1)
        for server in servers.values():
            server.ready()
        workers.ready()
        for shape, _, grad in cases.values():
            timed_calls(partial(grad, torch.zeros(shape)), 20, 5.0)
        section.info["servers"] = {
            k: " ".join(["gradtap", *s.command[1:]]) for k, s in servers.items()
        }
        for r in range(cfg.repeats):
            for model, (shape, targets, grad) in cases.items():
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(r))
                times = timed_calls(partial(grad, x), 100_000, cfg.batch_seconds, min_count=5)
                sequential[model].append(len(times) / sum(times))
                for name, server in servers.items():
                    load = workers.load(server, model, shape, targets, cfg.batch_seconds)
                    results.setdefault((model, name), []).append(load)
    finally:
        if workers is not None:
            workers.stop()
        for server in servers.values():
            server.stop()
    # The target is for the model whose per-sample cost drops most with batch size.
    chosen = min(drop, key=lambda m: drop[m])
    on_off: dict[str, float] = {}
    for model in cases:
        section.row(
            f"{model}: in-process sequential loop, one request at a time",
            "req/s",
            sequential[model],
            ratio=[1.0] * len(sequential[model]),
            ratio_to="in-process sequential",
        )
        for name in variants:
            loads = results[(model, name)]
            throughput = [load["throughput"] for load in loads]
            label = {
                "on": "batching on (--max-batch-size 16 --batch-timeout-us 2000)",
                "off": "batching off (--max-batch-size 1)",
                "default": "served, default server (batching flags not available)",
            }[name]
            extra: dict[str, Any] = {}
            if name == "on":
                off = [load["throughput"] for load in results[(model, "off")]]
                extra["ratio_to_batching_off"] = stats(ratios(throughput, off))
                on_off[model] = extra["ratio_to_batching_off"]["median"]
            section.row(
                f"{model}: {cfg.batch_clients} client processes, {label}",
                "req/s",
                throughput,
                ratio=ratios(throughput, sequential[model]),
                ratio_to="in-process sequential",
                p50_latency_ms=stats([load["p50_ms"] for load in loads])["median"],
                server_cpu_ms_per_call=stats([load["server_cpu_ms"] for load in loads])["median"],
                clients_cpu_ms_per_call=stats([load["clients_cpu_ms"] for load in loads])["median"],
                failed_calls=sum(load["errors"] for load in loads),
                **extra,
            )
    if available:
        section.target(
            f"batching on / off ({chosen}: per-sample cost x{drop[chosen]:.2f} at batch 16)",
            f">= {TARGET_RATIO}x",
            on_off[chosen],
            on_off[chosen] >= TARGET_RATIO,
            "x",
        )
    else:
        section.unavailable(
            "batching on vs off",
            "this gradtap serve has no --max-batch-size / --batch-timeout-us flags",
        )
        section.target("batching on / off", f">= {TARGET_RATIO}x", None, None, "x")
    section.info.update(
        clients=cfg.batch_clients,
        client_kind="processes",
        seconds_per_load=cfg.batch_seconds,
        batching_flags_available=available,
    )
    if available:
        cpu = {
            name: {
                key: stats([load[key] for load in results[(chosen, name)]])["median"]
                for key in ("server_cpu_ms", "clients_cpu_ms")
            }
            for name in variants
        }
        section.info["cpu_ms_per_call"] = {chosen: cpu}
        off, on = cpu["off"], cpu["on"]
        for name, label in (("on", "batching on"), ("off", "batching off")):
            measured = cpu[name]["server_cpu_ms"]
            section.target(
                f"server CPU per served {chosen} call, {cfg.batch_clients} clients ({label})",
                f"<= {TARGET_CPU_MS:g} ms",
                measured,
                measured <= TARGET_CPU_MS,
                "ms",
            )
        in_process_ms = 1e3 / stats(sequential[chosen])["median"]
        section.notes.append(
            f"CPU time per served {chosen} call (median): the server "
            f"{off['server_cpu_ms']:.2f} ms with batching off and {on['server_cpu_ms']:.2f} ms "
            f"with it on; the client processes {off['clients_cpu_ms']:.2f} ms and "
            f"{on['clients_cpu_ms']:.2f} ms. The computation itself takes {in_process_ms:.2f} "
            "ms per request in-process, so batching can save only a small share of each served "
            "call's CPU while the clients and the server share the same cores."
        )
    section.notes.append(
        f"{cfg.batch_clients} client processes (not threads, which would share one GIL), each "
        f"sending batch-1 requests back to back for {cfg.batch_seconds:g} s per measurement; "
        "objective sum, one target (resblock: conv1; seed-convnet: relu_1). The clients and the "
        f"server share the machine's {os.cpu_count()} cores."
    )
    return section

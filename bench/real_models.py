"""Real models: the zoo (bench/zoo.py) end to end through gradtap against eager PyTorch.

For each model, side by side in rounds: eager `torch.autograd.grad` in this process (the
baseline), gradtap's engine in this process on the same exported program, gradtap end to end
(the server computing on its compute thread), and gradtap end to end on a server started with
`--compute-threads 0`, computing on the thread that serves each call as servers did before:
the cause of the old slowdown and its fix, measured in the same run. Beside the times, each
server's voluntary context switches and minor page faults per call, which do not depend on a
quiet machine.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import zoo
from ._common import Config, GradtapServer, Section, interleaved, per_call_counters, ratios, stats

TARGET_RATIO = 1.10
COUNTED_CALLS = 5
"""Calls per model and server whose per-call counters are read (untimed)."""
WARM_CLIENTS = 8
"""Concurrent clients that warm each server first, as a server in service has been."""


def prepare(cfg: Config, directory: Path) -> tuple[list[zoo.Built], dict[str, str]]:
    """Builds the zoo and exports what the servers load; returns the models and, for entries
    that could not be built here, why."""
    built: list[zoo.Built] = []
    skipped = zoo.unavailable(cfg.quick)
    for entry in zoo.entries(cfg.quick):
        try:
            b = zoo.build(entry)
            if not entry.builtin:
                zoo.export(b, directory)
            print(f"  zoo: {entry.name} built: {entry.about}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one model that does not export is reported
            skipped[entry.name] = f"{type(e).__name__}: {e}"[:300]
            print(f"  zoo: {entry.name} skipped: {skipped[entry.name]}", file=sys.stderr)
            continue
        built.append(b)
    return built, skipped


def run(cfg: Config, directory: Path, built: list[zoo.Built], skipped: dict[str, str]) -> Section:
    from gradtap.client import Client
    from gradtap.server.engine.analysis import Engine
    from gradtap.server.models.registry import Registry
    from gradtap.server.models.repository import load_repository
    from gradtap.server.models.zoo import load_builtins

    section = Section("zoo")
    registry = Registry(torch.device("cpu"))
    load_builtins(registry)
    refused = load_repository(registry, directory)
    for name in refused:
        skipped[name] = "gradtap refused the archive (see the server log)"
    built = [b for b in built if b.entry.name not in refused]
    engine = Engine(torch.device("cpu"))
    servers = {
        "gradtap": GradtapServer(cfg.threads, directory, wait=False),
        "serving_threads": GradtapServer(
            cfg.threads, directory, extra=["--compute-threads", "0"], wait=False
        ),
    }
    rows: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.ready()
            _warm(server.address, 4 if cfg.quick else WARM_CLIENTS)
        clients = {k: Client(s.address, timeout=600) for k, s in servers.items()}
        for b in built:
            model = registry.get(b.entry.name)
            assert model is not None
            rows.append(_measure(cfg, b, model, engine, clients, servers))
            print(f"  zoo: {b.entry.name} done", file=sys.stderr)
        for c in clients.values():
            c.close()
    finally:
        for server in servers.values():
            server.stop()
    _report(section, rows, skipped)
    return section


def _measure(
    cfg: Config,
    b: zoo.Built,
    model: Any,
    engine: Any,
    clients: dict[str, Any],
    servers: dict[str, GradtapServer],
) -> dict[str, Any]:
    """One model, every variant side by side in rounds, then each server's counters."""
    from gradtap.client import Objective
    from gradtap.server.engine.analysis import Analysis, Target
    from gradtap.server.engine.objectives import Objective as EngineObjective

    entry = b.entry
    request = Analysis(
        inputs=list(b.inputs),
        targets=[Target(t) for t in entry.targets],
        objective=EngineObjective("sum"),
        input_gradients=b.float_inputs,
    )
    arrays = [x.numpy() for x in b.inputs]
    server_ms: dict[str, list[float]] = {k: [] for k in servers}

    def served(key: str) -> Callable[[], Any]:
        def call() -> Any:
            r = clients[key].analyze(
                entry.name,
                arrays,
                list(entry.targets),
                Objective.sum(),
                input_grads=b.float_inputs,
                outputs=False,
            )
            server_ms[key].append(r.metadata["timings"]["total_ms"])
            return r

        return call

    eager = zoo.eager(b)
    variants: dict[str, Callable[[], Any]] = {
        "eager": eager,
        "engine_in_process": lambda: engine.analyze(model, request),
        **{key: served(key) for key in servers},
    }
    error = _max_relative_error(served("gradtap")(), eager(), entry, b.float_inputs)
    series = interleaved(variants, rounds=cfg.repeats, budget_s=cfg.budget_s, warmup=2)
    counters = {
        key: per_call_counters(servers[key].pid, served(key), 2 if cfg.quick else COUNTED_CALLS)
        for key in servers
    }
    return {
        "entry": entry,
        "series": series,
        "server_ms": {k: v[-len(series[k]) :] for k, v in server_ms.items()},
        "counters": counters,
        "error": error,
    }


def _warm(address: str, clients: int) -> None:
    """A burst of concurrent calls, so that the server's serving threads have all served
    (a server computing on them then holds an OpenMP team on each, as in service)."""
    from gradtap.client import Client, Objective

    x = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)

    def calls() -> None:
        with Client(address, timeout=600) as c:
            for _ in range(3):
                c.analyze("seed-convnet", x, ["relu_1"], Objective.sum())

    threads = [threading.Thread(target=calls) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _max_relative_error(
    result: Any, reference: list[torch.Tensor], entry: zoo.Entry, float_inputs: bool
) -> float:
    got = [result.gradients[t] for t in entry.targets]
    if float_inputs:
        got += [result.input_grads[i] for i in sorted(result.input_grads)]
    errors = []
    for g, ref in zip(got, reference):
        r = ref.detach().numpy()
        errors.append(float(np.max(np.abs(g - r)) / (np.max(np.abs(r)) or 1.0)))
    return max(errors)


def _report(section: Section, rows: list[dict[str, Any]], skipped: dict[str, str]) -> None:
    worst: tuple[float, str] = (0.0, "")
    table = []
    for row in rows:
        entry: zoo.Entry = row["entry"]
        s = row["series"]
        base = s["eager"]
        label = f"{entry.name} ({entry.about})"
        ms = {k: [v * 1e3 for v in vs] for k, vs in s.items()}
        section.row(
            f"{label}: eager autograd.grad, in-process (baseline)",
            "ms",
            ms["eager"],
            ratio=[1.0] * len(base),
            ratio_to="eager",
        )
        section.row(
            f"{label}: gradtap engine, in-process",
            "ms",
            ms["engine_in_process"],
            ratio=ratios(s["engine_in_process"], base),
            ratio_to="eager",
        )
        e2e = ratios(s["gradtap"], base)
        counters = row["counters"]
        section.row(
            f"{label}: gradtap end to end",
            "ms",
            ms["gradtap"],
            ratio=e2e,
            ratio_to="eager",
            server_total_ms=stats(row["server_ms"]["gradtap"]),
            server_counters_per_call=counters["gradtap"],
            max_relative_error_vs_eager=row["error"],
        )
        old = ratios(s["serving_threads"], base)
        section.row(
            f"{label}: gradtap end to end, --compute-threads 0 (computing on serving threads)",
            "ms",
            ms["serving_threads"],
            ratio=old,
            ratio_to="eager",
            server_total_ms=stats(row["server_ms"]["serving_threads"]),
            server_counters_per_call=counters["serving_threads"],
        )
        measured = stats(e2e)["median"]
        worst = max(worst, (measured, entry.name))
        section.target(
            f"zoo {entry.name}: end to end / eager autograd.grad",
            f"<= {TARGET_RATIO}x",
            measured,
            measured <= TARGET_RATIO,
            "x",
        )
        table.append(
            {
                "model": entry.name,
                "family": entry.family,
                "about": entry.about,
                "eager_ms": stats(ms["eager"])["median"],
                "engine_in_process": stats(ratios(s["engine_in_process"], base))["median"],
                "end_to_end": measured,
                "end_to_end_spread": [stats(e2e)["min"], stats(e2e)["max"]],
                "serving_threads": stats(old)["median"],
                "server_total_ms": stats(row["server_ms"]["gradtap"])["median"],
                "switches_per_call": counters["gradtap"]["voluntary_switches"],
                "switches_per_call_serving_threads": counters["serving_threads"][
                    "voluntary_switches"
                ],
                "faults_per_call": counters["gradtap"]["minor_faults"],
                "faults_per_call_serving_threads": counters["serving_threads"]["minor_faults"],
                "max_relative_error": row["error"],
            }
        )
    if rows:
        section.target(
            "zoo: every model end to end / eager (worst)",
            f"<= {TARGET_RATIO}x",
            worst[0],
            worst[0] <= TARGET_RATIO,
            "x",
        )
    for name, why in skipped.items():
        section.unavailable(f"zoo: {name}", why)
    section.info["table"] = table
    section.info["target_ratio"] = TARGET_RATIO
    section.info["models"] = len(rows)
    section.notes.append(
        f"Batch {zoo.BATCH}, random weights, exported by `gradtap export`'s code (token "
        "models: 8 tokens, the last row left-padded); objective: the sum of output 0 (the "
        "logits); gradients of the listed module outputs (bench/architectures.py) and of "
        "float inputs. Each model is built the first way that can be built here: "
        "torchvision's architectures by timm's where torchvision cannot load. Eager: the "
        "original module with a forward hook on each target and one torch.autograd.grad. Engine "
        "in-process: gradtap's engine on the same exported program in this process. End to "
        "end: Client.analyze against a server subprocess on loopback. Each server's "
        f"voluntary context switches and minor page faults per call (over {COUNTED_CALLS} "
        "calls, read from /proc) are in the JSON and the zoo table."
    )

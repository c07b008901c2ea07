"""`python -m bench.openmp`: the old serving slowdown, reproduced in one process.

gradtap's engine runs the same analysis on a zoo model (bench/zoo.py) from one thread, then
from eight threads in turn, as a server computing on its serving threads did; a child process
under `OMP_WAIT_POLICY=PASSIVE` (every idle OpenMP thread sleeps at once) counts the model's
parallel regions. Voluntary context switches per call (getrusage) do not depend on a quiet
machine; the times (best of the calls) do.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from . import zoo


def _per_call(fn: Callable[[int], Any], calls: int) -> tuple[float, float]:
    """(best seconds, voluntary context switches per call) over `calls` calls of fn(i)."""
    for i in range(3):
        fn(i)
    best = float("inf")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t0)
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
    return best, switches / calls


def measure(names: list[str], calls: int, modes: list[str]) -> list[str]:
    from gradtap.server.engine.analysis import Analysis, Engine, Target
    from gradtap.server.engine.objectives import Objective
    from gradtap.server.models.registry import Registry
    from gradtap.server.models.repository import load_repository
    from gradtap.server.models.zoo import load_builtins

    lines = []
    with tempfile.TemporaryDirectory(prefix="gradtap-openmp-") as tmp:
        built = [zoo.build(e) for e in zoo.entries(only=names)]
        for b in built:
            if not b.entry.builtin:
                zoo.export(b, Path(tmp))
        registry = Registry(torch.device("cpu"))
        load_builtins(registry)
        load_repository(registry, Path(tmp))
        engine = Engine(torch.device("cpu"))
        pools = [ThreadPoolExecutor(1) for _ in range(8)]
        runs = []
        for b in built:
            model = registry.get(b.entry.name)
            request = Analysis(
                inputs=list(b.inputs),
                targets=[Target(t) for t in b.entry.targets],
                objective=Objective("sum"),
                input_gradients=b.float_inputs,
            )

            def one(i: int, model: Any = model, request: Any = request) -> Any:
                return engine.analyze(model, request)

            def eight(i: int, one: Callable[[int], Any] = one) -> Any:
                return pools[i % len(pools)].submit(one, i).result()

            runs.append((b.entry.name, one, eight))
        # every model from one thread first: once eight threads have teams, libgomp
        # throttles every team in the process, the first one's too
        for mode in modes:
            for name, one, eight in runs:
                best, switches = _per_call(eight if mode == "eight threads" else one, calls)
                lines.append(f"| {name} | {mode} | {switches:,.1f} | {best * 1e3:.2f} ms |")
        for pool in pools:
            pool.shutdown()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openmp", description=__doc__)
    parser.add_argument("--models", default="regnety_002,seed-convnet")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--modes", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    if args.modes:  # the child: print its rows only
        print("\n".join(measure(names, args.calls, args.modes.split(";"))), flush=True)
        return 0
    rows = measure(names, args.calls, ["one thread", "eight threads"])
    child = subprocess.run(
        [sys.executable, "-m", "bench.openmp", "--models", args.models, "--calls",
         str(args.calls), "--modes", "one thread, under OMP_WAIT_POLICY=PASSIVE"],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    rows += [line for line in child.stdout.splitlines() if line.startswith("|")]
    print("| model | the engine called from | voluntary switches / call | best time |")
    print("|---|---|---|---|")
    print("\n".join(sorted(rows, key=lambda row: row.split("|")[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

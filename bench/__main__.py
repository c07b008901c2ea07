"""`python -m bench`: run gradtap's benchmarks and report them (see docs/performance.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECTIONS = (
    "overhead", "zoo", "language", "small_calls", "transport", "batching", "peers", "memory", "ab",
)  # fmt: skip
NEEDS_MAIN_SERVER = {"overhead", "small_calls", "transport", "peers", "ab"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="gradtap's benchmarks: every comparison side by side in one run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few rounds: seconds, not minutes"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        metavar="A,B",
        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}",
    )
    parser.add_argument("--repeats", type=int, metavar="N", help="rounds per comparison")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch intra-op threads everywhere (nproc)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the JSON results (bench/results/bench.json)",
    )
    parser.add_argument(
        "--compare",
        default="",
        metavar="REF,REF",
        help="git refs whose servers the ab section measures beside this tree's (e.g. "
        "54cfe66,main); without it, no ab section",
    )
    parser.add_argument("--write-docs", action="store_true", help="also write docs/performance.md")
    parser.add_argument(
        "--docs", type=Path, metavar="PATH", help="where --write-docs writes (docs/performance.md)"
    )
    args = parser.parse_args(argv)
    names = [n.strip().replace("-", "_") for n in args.only.split(",") if n.strip()]
    args.refs = [r.strip() for r in args.compare.split(",") if r.strip()]
    if not args.refs:
        names = [n for n in names if n != "ab"]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = [n for n in SECTIONS if n in names]
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from gradtap.cli.serve import SPIN_COUNT

    # The servers' OpenMP spin count here too, before torch loads libgomp: with libgomp's
    # default, this process's idle OpenMP thread spun 4-9 ms after each in-process baseline,
    # taking a core from the server measured next on a small machine.
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    import torch

    from . import report
    from ._common import ROOT, Config, GradtapServer, Section

    cfg = Config.make(args.quick, args.repeats, args.threads)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": report.command_line(str(ROOT)),
        "machine": report.machine(),
        "config": {
            "quick": cfg.quick,
            "repeats": cfg.repeats,
            "threads": cfg.threads,
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""),
            "sections": args.sections,
        },
        "sections": {},
    }
    sections: dict[str, Any] = results["sections"]
    failed = False

    def attempt(name: str, fn: Callable[[], Section]) -> None:
        nonlocal failed
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            sections[name] = fn().as_json()
        except Exception:
            failed = True
            sections[name] = {"error": traceback.format_exc()}
            print(sections[name]["error"], file=sys.stderr)
        sections[name]["wall_s"] = round(time.perf_counter() - t0, 1)

    with tempfile.TemporaryDirectory(prefix="gradtap-bench-") as tmp:
        from . import models

        main_repo, batch_repo = Path(tmp, "main"), Path(tmp, "batching")
        main_repo.mkdir()
        batch_repo.mkdir()
        resnet = None
        if {"overhead", "ab"} & set(args.sections):
            _, resnet = models.export_resnet(main_repo, cfg.resnet_batch, cfg.resnet_image)
        if "transport" in args.sections:
            models.export_repeat(main_repo, cfg.transport_bytes)
        if {"peers", "ab"} & set(args.sections):
            for size in cfg.naive_bytes:
                models.export_repeat(main_repo, size)
        from gradtap.server.models.zoo import builtin_module

        convnet = builtin_module("seed-convnet")
        server = None
        try:
            if NEEDS_MAIN_SERVER & set(args.sections):
                server = GradtapServer(cfg.threads, main_repo, extra=["--shared-memory"])
                command = " ".join(["gradtap", *server.command[1:]])
                # the run's temporary folder says nothing about the machine, and changes each run
                results["config"]["main_server"] = command.replace(str(main_repo), "REPOSITORY")
            for name in args.sections:
                if name == "overhead":
                    from . import overhead

                    assert server is not None and resnet is not None
                    attempt(name, lambda: overhead.run(cfg, server.address, resnet))
                elif name == "zoo":
                    from . import real_models

                    def run_zoo() -> Section:
                        directory = Path(tmp, "zoo")
                        directory.mkdir()
                        built, skipped = real_models.prepare(cfg, directory)
                        return real_models.run(cfg, directory, built, skipped)

                    attempt(name, run_zoo)
                elif name == "language":
                    from . import language

                    attempt(name, lambda: language.run(cfg))
                elif name == "small_calls":
                    from . import small_calls

                    assert server is not None
                    attempt(name, lambda: small_calls.run(cfg, server.address))
                elif name == "transport":
                    from . import transport

                    assert server is not None
                    attempt(name, lambda: transport.run(cfg, server.address))
                elif name == "batching":
                    from . import batching

                    def run_batching() -> Section:
                        _, resblock = models.export_resblock(batch_repo)
                        return batching.run(cfg, batch_repo, resblock, convnet)

                    attempt(name, run_batching)
                elif name == "peers":
                    from . import peers

                    assert server is not None
                    attempt(name, lambda: peers.run(cfg, server.address, convnet))
                elif name == "memory":
                    from . import memory

                    attempt(name, lambda: memory.run(cfg))
                elif name == "ab":
                    from . import ab

                    assert server is not None
                    attempt(name, lambda: ab.run(cfg, args.refs, server.address, main_repo))
        finally:
            if server is not None:
                server.stop()

    results["wall_s"] = time.perf_counter() - started
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    out = args.json or ROOT / "bench" / "results" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(results), indent=2, allow_nan=False) + "\n")
    print(report.tables(results))
    print(f"\nwrote {out}", file=sys.stderr)
    if args.write_docs:
        docs = args.docs or ROOT / "docs" / "performance.md"
        previous = docs.read_text() if docs.exists() else ""
        docs.write_text(report.with_gpu_section(report.markdown(results), previous))
        print(f"wrote {docs}", file=sys.stderr)
    return 1 if failed else 0


def _finite(value: Any) -> Any:
    """The results with NaN and infinities as null, which JSON can carry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())

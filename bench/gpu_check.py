"""`make gpu-check` (`python -m bench.gpu_check`): the CUDA path, proven on a GPU in minutes.

On a machine where torch sees CUDA: runs the CUDA tests (tests/gpu), then a short bench:
parity of every objective on the seed models and two real architectures (served on the GPU
against eager PyTorch on the same GPU, rtol 1e-4), out-of-memory recovery, end to end against
in-process on the zoo, and 16 concurrent clients against the in-process loop. Writes
bench/results/gpu.json and the GPU section of docs/performance.md, naming the device.
Without CUDA it says so and exits 0, writing nothing. `--device cpu` runs the same bench on
the CPU, to try the script where no GPU is lent (its figures are not GPU figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import ROOT, GradtapServer, Section, interleaved, ratios, stats
from .report import GPU_HEADING

E2E_RATIO = 1.10
BATCHING_RATIO = 1.5
RTOL, ATOL = 1e-4, 1e-5
REAL = ("resnet50", "llama")
"""The two real architectures whose every objective is checked."""
BUDGET_S = 8 * 60


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try it")
    parser.add_argument("--json", type=Path, help="bench/results/gpu.json")
    parser.add_argument("--docs", type=Path, help="docs/performance.md")
    parser.add_argument("--write-docs", action="store_true", help="write the GPU section")
    parser.add_argument("--skip-tests", action="store_true", help="only the bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the quick zoo (bench/zoo.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: skipped: torch sees no CUDA device here; nothing was written")
        return 0
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (a trial run)"
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "sections": {}}
    failed = False
    if not args.skip_tests:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/gpu", "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BUDGET_S / 2,
            check=False,
        )
        summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
        results["tests"] = {"returncode": tests.returncode, "summary": summary}
        failed |= tests.returncode != 0
        print(f"gpu-check: tests/gpu: {summary}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gradtap-gpu-check-") as tmp:
        sections = results["sections"]
        for section_name, fn in (("parity", _parity), ("zoo", _zoo), ("batching", _batching)):
            try:
                section = fn(device, Path(tmp), args.repeats, args.quick)
                sections[section_name] = section.as_json()
            except Exception as e:  # noqa: BLE001 - reported, and the check fails
                failed = True
                sections[section_name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"gpu-check: {section_name} failed: {e}", file=sys.stderr)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    budget = Section("run")
    budget.target(
        "the whole check",
        f"< {BUDGET_S // 60} min",
        results["wall_s"] / 60,
        results["wall_s"] < BUDGET_S,
        "min",
    )
    results["sections"]["run"] = budget.as_json()
    out = args.json or ROOT / "bench" / "results" / "gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(markdown(results))
    if args.write_docs:
        write_section(args.docs or ROOT / "docs" / "performance.md", markdown(results))
    return 1 if failed else 0


# -- the checks ------------------------------------------------------------------------------


def _parity(device: torch.device, directory: Path, repeats: int, quick: bool) -> Section:
    """Every objective, served on the device against eager PyTorch on the device."""
    from gradtap.client import Client

    from . import zoo

    section = Section("parity")
    seeds = [zoo.build(e) for e in zoo.entries(only=("seed-convnet", "seed-mlp"))]
    real = [zoo.build(e) for e in zoo.entries(only=REAL)]
    for b in real:
        zoo.export(b, directory)
    if device.type == "cuda":
        blowup = torch.export.export(Blowup(), (torch.zeros(1, 1024),))
        torch.export.save(blowup, directory / "blowup.pt2")
    for name in sorted(set(REAL) - {b.entry.name for b in real}):
        section.unavailable(name, "its library is not installed here")
    server = GradtapServer(1, directory, device=device.type, extra=["--max-batch-size", "1"])
    worst = 0.0
    try:
        with Client(server.address, timeout=600) as client:
            for b in [*seeds, *real]:
                for objective in OBJECTIVES:
                    error = _objective_error(client, b, objective, device)
                    worst = max(worst, error)
                    section.row(
                        f"{b.entry.name}, objective {objective}: max relative difference",
                        "",
                        [error],
                    )
            section.target(
                f"every objective within rtol {RTOL:g}", f"<= {RTOL:g}", worst, worst <= RTOL
            )
            if device.type == "cuda":  # the CPU's allocator would try to get the 400 GB
                oom = _out_of_memory(client)
                section.info["out_of_memory"] = oom
                section.target(
                    "out of memory: RESOURCE_EXHAUSTED, then serving on",
                    "yes",
                    1.0 if oom["recovered"] else 0.0,
                    bool(oom["recovered"]),
                )
    finally:
        server.stop()
    return section


OBJECTIVES = ("sum", "logit", "cross_entropy", "mse", "grad_outputs")


def _losses(logits: torch.Tensor) -> dict[str, tuple[Any, Any]]:
    """Each objective as the client states it and as eager PyTorch computes it."""
    from gradtap.client import Objective

    rows = logits.shape[0]
    width = logits.reshape(rows, -1).shape[1]
    picks = [i % width for i in range(rows)]
    classes = logits.shape[1]
    labels = (torch.arange(rows * int(np.prod(logits.shape[2:], dtype=int))) % classes).reshape(
        (rows, *logits.shape[2:])
    )
    ones = torch.ones(logits.shape)
    half = torch.full(logits.shape, 0.5)
    return {
        "sum": (Objective.sum(), lambda t: t.sum()),
        "logit": (
            Objective.logit(picks),
            lambda t: t.reshape(rows, -1)[torch.arange(rows), torch.tensor(picks)].sum(),
        ),
        "cross_entropy": (
            Objective.cross_entropy(labels.numpy()),
            lambda t: torch.nn.functional.cross_entropy(t, labels.to(t.device)),
        ),
        "mse": (
            Objective.mse(ones.numpy()),
            lambda t: torch.nn.functional.mse_loss(t, ones.to(t.device)),
        ),
        "grad_outputs": (
            Objective.grad_outputs(half.numpy()),
            lambda t: (t * half.to(t.device)).sum(),
        ),
    }


def _objective_error(client: Any, b: Any, objective: str, device: torch.device) -> float:
    """The largest relative difference, over every returned gradient, served vs eager."""
    from . import zoo

    logits = b.forward()
    stated, computed = _losses(logits)[objective]
    reference = zoo.eager(b, device, loss=computed)()
    r = client.analyze(
        b.entry.name,
        [x.numpy() for x in b.inputs],
        list(b.entry.targets),
        stated,
        input_grads=b.float_inputs,
        outputs=False,
    )
    got = [r.gradients[t] for t in b.entry.targets]
    if b.float_inputs:
        got += [r.input_grads[i] for i in sorted(r.input_grads)]
    worst = 0.0
    for g, ref in zip(got, reference):
        want = ref.detach().cpu().numpy()
        scale = np.maximum(np.abs(want), ATOL / RTOL)
        worst = max(worst, float(np.max(np.abs(g - want) / scale)))
    return worst


class Blowup(torch.nn.Module):
    """A small result from an intermediate far past any GPU's memory (about 400 GB)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(100_000_000, 1).sum(dim=0, keepdim=True)


def _out_of_memory(client: Any) -> dict[str, Any]:
    """A call that cannot fit (the blowup model), then a small call on the same server."""
    from gradtap.client import GradtapError, Objective

    outcome: dict[str, Any] = {}
    try:
        client.analyze("blowup", np.ones((1, 1024), np.float32), outputs=True)
        outcome["code"] = "OK"
    except GradtapError as e:
        outcome["code"] = e.code.name
        outcome["reason"] = e.reason
    r = client.analyze("seed-mlp", np.ones((1, 784), np.float32), ["relu_1"], Objective.sum())
    outcome["recovered"] = bool(
        outcome["code"] == "RESOURCE_EXHAUSTED" and r.gradients["relu_1"].shape == (1, 64)
    )
    return outcome


def _zoo(device: torch.device, directory: Path, repeats: int, quick: bool) -> Section:
    """End to end through a server on the device against the engine in-process on it."""
    from gradtap.client import Client, Objective
    from gradtap.server.engine.analysis import Analysis, Engine, Target
    from gradtap.server.engine.objectives import Objective as EngineObjective
    from gradtap.server.models.registry import Registry
    from gradtap.server.models.repository import load_repository
    from gradtap.server.models.zoo import load_builtins

    from . import zoo

    section = Section("zoo")
    built = [zoo.build(e) for e in zoo.entries(quick)]
    for b in built:
        if not b.entry.builtin and not (directory / f"{b.entry.name}.pt2").exists():
            zoo.export(b, directory)
    registry = Registry(device)
    load_builtins(registry)
    load_repository(registry, directory)
    engine = Engine(device)
    server = GradtapServer(1, directory, device=device.type)
    worst = 0.0
    try:
        with Client(server.address, timeout=600) as client:
            for b in built:
                model = registry.get(b.entry.name)
                if model is None:
                    continue
                request = Analysis(
                    inputs=[x.to(device) for x in b.inputs],
                    targets=[Target(t) for t in b.entry.targets],
                    objective=EngineObjective("sum"),
                    input_gradients=b.float_inputs,
                )
                arrays = [x.numpy() for x in b.inputs]

                def in_process(model: Any = model, request: Any = request) -> None:
                    outcome = engine.analyze(model, request)
                    for c in outcome.tensors:  # the host copy the server also makes
                        c.tensor.cpu()

                def served(b: Any = b, arrays: Any = arrays) -> None:
                    client.analyze(
                        b.entry.name,
                        arrays,
                        list(b.entry.targets),
                        Objective.sum(),
                        input_grads=b.float_inputs,
                        outputs=False,
                    )

                series = interleaved(
                    {"in_process": in_process, "served": served},
                    rounds=repeats,
                    budget_s=20,
                    warmup=2,
                )
                r = ratios(series["served"], series["in_process"])
                section.row(
                    f"{b.entry.name}: in-process engine",
                    "ms",
                    [v * 1e3 for v in series["in_process"]],
                )
                section.row(
                    f"{b.entry.name}: end to end",
                    "ms",
                    [v * 1e3 for v in series["served"]],
                    ratio=r,
                    ratio_to="in-process",
                )
                measured = stats(r)["median"]
                worst = max(worst, measured)
                section.target(
                    f"zoo {b.entry.name}: end to end / in-process",
                    f"<= {E2E_RATIO}x",
                    measured,
                    measured <= E2E_RATIO,
                    "x",
                )
    finally:
        server.stop()
    section.info["worst"] = worst
    return section


def _batching(device: torch.device, directory: Path, repeats: int, quick: bool) -> Section:
    """seed-convnet: 16 concurrent client processes against the in-process sequential loop."""
    from gradtap.server.models.zoo import builtin_module

    from .batching import BATCH_ON, WORKERS, Workers

    section = Section("batching")
    module = builtin_module("seed-convnet").to(device)
    for p in module.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        xi = x.detach().requires_grad_(True)
        logits, hidden = module(xi)
        g = torch.autograd.grad(logits.sum(), [hidden])[0]
        g.cpu()

    for _ in range(20):
        step()
    sequential = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(200):
            step()
        sequential.append(200 / (time.perf_counter() - t0))
    server = GradtapServer(1, directory, device=device.type, extra=BATCH_ON + WORKERS, wait=False)
    workers = Workers(16, 1)
    try:
        server.ready()
        workers.ready()
        served = [
            workers.load(server, "seed-convnet", (1, 3, 28, 28), ["relu_1"], 3.0)["throughput"]
            for _ in range(repeats)
        ]
    finally:
        workers.stop()
        server.stop()
    section.row("seed-convnet: in-process sequential loop", "req/s", sequential)
    r = ratios(served, sequential)
    section.row(
        "seed-convnet: 16 client processes, batching on",
        "req/s",
        served,
        ratio=r,
        ratio_to="in-process sequential",
    )
    measured = stats(r)["median"]
    section.target(
        "16 clients / in-process sequential",
        f">= {BATCHING_RATIO}x",
        measured,
        measured >= BATCHING_RATIO,
        "x",
    )
    return section


# -- the report ------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    from .report import section_table, targets_table

    lines = [
        GPU_HEADING,
        "",
        f"Device: **{results['device']}**, torch {results['torch']}; "
        f"wall time {results.get('wall_s', 0):.0f} s.",
        "",
    ]
    if "tests" in results:
        lines += [f"tests/gpu: {results['tests']['summary']}", ""]
    sections = results["sections"]
    lines += [targets_table(sections), ""]
    for name, section in sections.items():
        lines += [f"### GPU: {name}", ""]
        if "error" in section:
            lines += [f"Failed: `{section['error']}`", ""]
            continue
        lines += [section_table(section), ""]
    return "\n".join(lines)


def write_section(docs: Path, section: str) -> None:
    """Replaces the GPU section of the performance page (its last section), or appends it."""
    text = docs.read_text() if docs.exists() else ""
    head = text.split(GPU_HEADING)[0].rstrip("\n")
    docs.write_text(f"{head}\n\n{section}" if head else section)


if __name__ == "__main__":
    sys.exit(main())

"""Issue 10's real architectures (bench/architectures.py), full size, through `gradtap
export` and the served graph.

For each architecture, built the first way that can be built here (the architecture itself,
else its stated equivalent: torchvision 0.28 cannot load beside the CPU build of torch, and
timm runs through bench/timm_shim.py), with random weights (the pretrained MiniLM excepted):
export it and load the archive in gradtap's safe loader (loaded), check that every input,
output and dynamic dimension has a name (described), and that the served outputs match the
module's (the exporter's check, within atol 1e-5 + rtol 1e-4) and the activation and
gradient at a module in the middle of the network, served, equal eager's on the module
(rtol 1e-3, atol 1e-4) (matched). Prints one JSON line per architecture, then a table.

    .venv/bin/python scripts/real_models.py [--only NAME ...] [--json FILE]

Minutes on two cores; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package

import torch  # noqa: E402
from gradtap.server.engine.analysis import Analysis, Engine, Target  # noqa: E402
from gradtap.server.engine.objectives import Objective  # noqa: E402
from gradtap.server.export import Exported, ExportError, ExportOptions, export  # noqa: E402
from torch import nn  # noqa: E402

from bench.architectures import Architecture, chosen, select  # noqa: E402
from bench.zoo import first_output  # noqa: E402


def _middle_module(result: Exported) -> str | None:
    """A module called once, in the middle of the graph, whose output is a float tensor."""
    model = result.model
    order = {name: i for i, name in enumerate(model.nodes)}
    candidates = [
        (order[node], path)
        for path, (_, node) in model.modules.items()
        if len(model.module_calls.get(path, [])) == 1
        and model.nodes[node].differentiable
        and path.count(".") >= 2
    ]
    if not candidates:
        return None
    candidates.sort()
    return candidates[len(candidates) // 2][1]


def _gradient_check(result: Exported, path: str) -> float:
    """The largest |served - eager| over the activation and gradient at module `path`, for
    the sum of output 0; raises if eager's module output is not one tensor.

    Eager keeps the module's output as it was computed: the hook hands the model a copy, so
    an in-place operation later (a ResNet's `hidden += residual`) changes the copy, not the
    value kept, and the gradient kept is the gradient at that value. That is what gradtap
    serves (docs/real-models.md); a plain retain_grad() on the output would see the value
    after the in-place operation instead."""
    kept: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, __: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"{path} returns a {type(output).__name__}")
        hidden.retain_grad()
        kept["hidden"] = hidden
        copy = hidden.clone()
        return (copy, *output[1:]) if isinstance(output, tuple) else copy

    module = result.module
    handle = module.get_submodule(path).register_forward_hook(keep)
    try:
        out = module(**result.inputs)
    finally:
        handle.remove()
    first_output(out).sum().backward()
    hidden = kept["hidden"]
    model = result.model
    tensors = [result.inputs[spec.name] for spec in model.inputs]
    outcome = Engine(torch.device("cpu")).analyze(
        model,
        Analysis(
            inputs=tensors, targets=[Target(path, activation=True)], objective=Objective("sum")
        ),
    )
    got = {c.role.value: c.tensor for c in outcome.tensors}
    assert hidden.grad is not None
    worst = 0.0
    for served, eager in ((got["activation"], hidden.detach()), (got["gradient"], hidden.grad)):
        if tuple(served.shape) != tuple(eager.shape):
            raise AssertionError(
                f"{path}: served {tuple(served.shape)}, eager {tuple(eager.shape)}"
            )
        worst = max(worst, float((served - eager).abs().max()))
        torch.testing.assert_close(served, eager, rtol=1e-3, atol=1e-4)
    return worst


def check(architecture: Architecture, root: Path) -> dict[str, Any]:
    """Exports, describes and matches one architecture; the report says how far it got."""
    way, why = chosen(architecture, "full")
    report: dict[str, Any] = {
        "architecture": architecture.name,
        "built_as": way.label() if way else None,
        "equivalent": way.about if way and way is not architecture.ways[0] else "",
        "not_built_as": why,
        "loaded": False,
        "described": False,
        "matched": False,
    }
    if way is None:
        report.update(ok=False, error="; ".join(why))
        return report
    started = time.perf_counter()
    try:
        source = way.source("full", root)
        image = architecture.image.get("full") if way.library != "transformers" else None
        try:
            result = export(source, ExportOptions(sequence=(2, 128), input_shape=image))
        except ExportError as e:
            report["loaded"] = "does not reproduce the module" in str(e)
            raise
        report["loaded"] = True
        model = result.model
        unnamed = [
            s.name or str(i)
            for i, s in enumerate([*model.inputs, *model.outputs])
            if not s.name or any(d.size is None and not d.name for d in s.dims)
        ]
        if unnamed:
            raise AssertionError(f"unnamed inputs, outputs or dimensions: {unnamed}")
        report["described"] = True
        path = _middle_module(result)
        gradient_diff = _gradient_check(result, path) if path else None
        report.update(
            ok=True,
            matched=True,
            seconds=round(time.perf_counter() - started, 1),
            inputs=[r[1:] for r in result.signature() if r[0] == "input"],
            outputs=[r[1:] for r in result.signature() if r[0] == "output"],
            max_output_diff=result.max_abs_diff,
            checked_inputs=result.checked,
            module_checked=path,
            max_module_diff=gradient_diff,
            in_place_notes=len(result.notes),
            undone=sum("cannot undo" in n for n in result.notes),
            multi_call_modules=sum(len(c) > 1 for c in model.module_calls.values()),
        )
    except Exception as e:  # report and go on to the next architecture
        report.update(
            ok=False,
            seconds=round(time.perf_counter() - started, 1),
            error=f"{type(e).__name__}: {str(e)[:600]}",
        )
        traceback.print_exc(file=sys.stderr)
    return report


def table(reports: list[dict[str, Any]]) -> str:
    """The reports as a markdown table: what was built, how far it got, the largest errors."""

    def mark(value: Any) -> str:
        return "yes" if value else "**no**"

    def number(value: Any) -> str:
        return "-" if value is None else f"{value:.3g}"

    lines = [
        "| architecture (issue 10) | built here as | loaded | described | matched "
        "| outputs: max \\|diff\\| | middle module: max \\|diff\\| | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        built = r["built_as"] or "nothing: " + "; ".join(r["not_built_as"])
        if r["equivalent"]:
            built += f" ({r['equivalent']})"
        module = r.get("module_checked")
        lines.append(
            f"| {r['architecture']} | {built} | {mark(r['loaded'])} | {mark(r['described'])} "
            f"| {mark(r['matched'])} | {number(r.get('max_output_diff'))} "
            f"| {f'`{module}`: ' if module else ''}{number(r.get('max_module_diff'))} "
            f"| {r.get('seconds', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="architectures whose name contains one of these")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args()
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in select(tuple(args.only or ())):
            print(f"== {architecture.name}", file=sys.stderr, flush=True)
            reports.append(check(architecture, Path(tmp)))
            print(json.dumps(reports[-1]), flush=True)
    passed = sum(r["ok"] for r in reports)
    print(table(reports))
    print(f"{passed} passed, {len(reports) - passed} failed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()

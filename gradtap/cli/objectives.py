"""--objective SPEC, --objective-output and --objective-node: the objective of a command."""

from __future__ import annotations

from pathlib import Path

from ._client import Objective
from .arrays import load_npy
from .options import OBJECTIVE_SPECS, note, usage


def _ints(text: str, kind: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        usage(f"{kind} takes comma-separated integers, e.g. {kind}:3 or {kind}:0,3", "--objective")
    return values


def parse_objective(spec: str, output: int | str, node: str | None) -> Objective | None:
    """An Objective from SPEC (see OBJECTIVE_SPECS), at `output` or `node`; None for none."""
    kind, colon, argument = spec.strip().partition(":")
    kind = kind.strip().lower().replace("-", "_")
    if kind in ("sum", "none"):
        if colon:
            usage(f"{kind} takes no argument, got {spec!r}", "--objective")
        return Objective.sum(output=output, node=node) if kind == "sum" else None
    if kind in ("logit", "cross_entropy", "mse", "grad_outputs") and not argument.strip():
        example = f"{kind}:3" if kind in ("logit", "cross_entropy") else f"{kind}:FILE.npy"
        usage(f"{kind} needs an argument, e.g. {example}", "--objective")
    if kind == "logit":
        return Objective.logit(_ints(argument, kind), output=output, node=node)
    if kind == "cross_entropy":
        return Objective.cross_entropy(_ints(argument, kind), output=output, node=node)
    if kind in ("mse", "grad_outputs"):
        path = Path(argument.strip())
        if not path.is_file():
            usage(f"{kind}: file {path} does not exist", "--objective")
        array = load_npy(path, "--objective")
        if kind == "mse":
            return Objective.mse(array, output=output, node=node)
        return Objective.grad_outputs(array, output=output, node=node)
    usage(f"unknown objective {spec!r}; use one of: {OBJECTIVE_SPECS}", "--objective")


def describe_objective(objective: Objective | None) -> str:
    """ "cross_entropy at output 0", "mse at node relu_1", or "none"."""
    if objective is None:
        return "none"
    which = objective.message.WhichOneof("kind") or "?"
    site = getattr(objective.message, which).site
    return f"{which} at {_site(site.output_name or site.output, site.node)}"


def objective_for(
    spec: str | None, output: int | str, node: str | None, wants_gradients: bool
) -> Objective | None:
    """The objective of analyze and analyze-many: sum, said in a note, when gradients are
    asked for without --objective; none when only outputs or activations are."""
    if spec is None and (wants_gradients or node is not None):
        note(f"no --objective: using sum, the sum of every element of {_site(output, node)}")
        spec = "sum"
    return None if spec is None else parse_objective(spec, output, node)


def _site(output: int | str, node: str | None) -> str:
    return f"node {node}" if node else f"output {output}"

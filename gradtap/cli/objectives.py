"""--objective SPEC and the options that complete it (--objective-output, --objective-node,
--position, --class-dim, --ignore-index, --shift): the objective of a command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._client import Objective
from .arrays import load_npy
from .options import OBJECTIVE_SPECS, note, usage

POSITIONED = ("logit", "log_prob", "logit_diff", "prob_diff")
"""The objectives --position applies to."""
_ARGUMENTED = ("logit", "log_prob", "logit_diff", "prob_diff", "cross_entropy", "mse")
_EXAMPLES = {
    "logit": "logit:3",
    "log_prob": "log_prob:5,8,13",
    "logit_diff": "logit_diff:17/4",
    "prob_diff": "prob_diff:17/4",
    "cross_entropy": "cross_entropy:3 or cross_entropy:labels.npy",
    "mse": "mse:FILE.npy",
    "grad_outputs": "grad_outputs:FILE.npy",
}


@dataclass(frozen=True)
class ObjectiveOptions:
    """What completes a SPEC: the position of a language model's logits (--position, one, or
    one per token for log_prob) and cross_entropy's --class-dim, --ignore-index and --shift."""

    position: str | None = None
    class_dim: int | None = None
    ignore_index: int | None = None
    shift: bool = False


def _ints(text: str, kind: str, option: str = "--objective") -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        example = "--position -1 or --position 5,6,7" if option == "--position" else _EXAMPLES[kind]
        usage(f"{kind} takes comma-separated integers, e.g. {example}", option)
    return values


def _file(argument: str, kind: str) -> Path:
    path = Path(argument.strip())
    if not path.is_file():
        usage(f"{kind}: file {path} does not exist", "--objective")
    return path


def _position(options: ObjectiveOptions, kind: str, default: int | None) -> int | None:
    """The one position of logit, logit_diff and prob_diff; `none` for a site shaped (N, C)."""
    text = options.position
    if text is None:
        return default
    if text.strip().lower() == "none":
        return None
    values = _ints(text, kind, "--position")
    if len(values) != 1:
        usage(f"{kind} reads one position, got {text!r}", "--position")
    return values[0]


def _diff(kind: str, argument: str) -> tuple[list[int], list[int]]:
    correct, slash, wrong = argument.partition("/")
    if not slash or not correct.strip() or not wrong.strip():
        usage(f"{kind} takes CORRECT/WRONG token ids, e.g. {_EXAMPLES[kind]}", "--objective")
    return _ints(correct, kind), _ints(wrong, kind)


def _checked(kind: str, options: ObjectiveOptions) -> None:
    """A usage error for an option that the objective `kind` does not read."""
    if options.position is not None and kind not in POSITIONED:
        usage(f"--position applies to {', '.join(POSITIONED)}, not {kind}", "--position")
    if kind == "cross_entropy":
        return
    for given, option in (
        (options.class_dim is not None, "--class-dim"),
        (options.ignore_index is not None, "--ignore-index"),
        (options.shift, "--shift"),
    ):
        if given:
            usage(f"{option} applies to cross_entropy, not {kind}", option)


def parse_objective(
    spec: str,
    output: int | str,
    node: str | None,
    options: ObjectiveOptions = ObjectiveOptions(),
) -> Objective | None:
    """An Objective from SPEC (see OBJECTIVE_SPECS), at `output` or `node`; None for none."""
    kind, colon, argument = spec.strip().partition(":")
    kind = kind.strip().lower().replace("-", "_")
    if kind not in (*_ARGUMENTED, "grad_outputs", "sum", "none"):
        usage(f"unknown objective {spec!r}; use one of: {OBJECTIVE_SPECS}", "--objective")
    _checked(kind, options)
    if kind in ("sum", "none"):
        if colon:
            usage(f"{kind} takes no argument, got {spec!r}", "--objective")
        return Objective.sum(output=output, node=node) if kind == "sum" else None
    if not argument.strip():
        usage(f"{kind} needs an argument, e.g. {_EXAMPLES[kind]}", "--objective")
    if kind == "logit":
        position = _position(options, kind, None)
        return Objective.logit(_ints(argument, kind), position, output=output, node=node)
    if kind == "log_prob":
        text = options.position
        positions = None if text is None else _ints(text, kind, "--position")
        return Objective.log_prob(_ints(argument, kind), positions, output=output, node=node)
    if kind in ("logit_diff", "prob_diff"):
        correct, wrong = _diff(kind, argument)
        make = Objective.logit_diff if kind == "logit_diff" else Objective.prob_diff
        return make(correct, wrong, _position(options, kind, -1), output=output, node=node)
    if kind == "cross_entropy":
        text = argument.strip()
        labels = load_npy(_file(text, kind), "--objective") if text.endswith(".npy") else None
        return Objective.cross_entropy(
            _ints(text, kind) if labels is None else labels,
            class_dim=options.class_dim,
            ignore_index=-100 if options.ignore_index is None else options.ignore_index,
            shift=options.shift,
            output=output,
            node=node,
        )
    array = load_npy(_file(argument, kind), "--objective")
    if kind == "mse":
        return Objective.mse(array, output=output, node=node)
    return Objective.grad_outputs(array, output=output, node=node)


def describe_objective(objective: Objective | None) -> str:
    """ "cross_entropy at output 0", "mse at node relu_1", or "none"."""
    if objective is None:
        return "none"
    which: str = objective.message.WhichOneof("kind") or "?"
    message = getattr(objective.message, which)
    if which == "logit_diff" and message.probabilities:
        which = "prob_diff"
    site = message.site
    return f"{which} at {_site(site.output_name or site.output, site.node)}"


def objective_for(
    spec: str | None,
    output: int | str,
    node: str | None,
    wants_gradients: bool,
    options: ObjectiveOptions = ObjectiveOptions(),
) -> Objective | None:
    """The objective of analyze and analyze-many: sum, said in a note, when gradients are
    asked for without --objective; none when only outputs or activations are."""
    if spec is None and (wants_gradients or node is not None):
        note(f"no --objective: using sum, the sum of every element of {_site(output, node)}")
        spec = "sum"
    return None if spec is None else parse_objective(spec, output, node, options)


def _site(output: int | str, node: str | None) -> str:
    return f"node {node}" if node else f"output {output}"

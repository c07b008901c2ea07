"""The options the commands share, declared once, and how every command speaks: notes on
stderr, usage errors naming the option."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from ._client import Client

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 300.0
"""Seconds: the server's default --max-call-seconds, the longest any call may run there."""

OBJECTIVE_SPECS = (
    "sum | logit:K[,K...] | cross_entropy:L[,L...] | mse:FILE.npy | grad_outputs:FILE.npy | none"
)


def note(message: str) -> None:
    """A line on stderr that says what the command chose or assumed."""
    typer.echo(f"note: {message}", err=True)


def deprecated(old: str, new: str, why: str = "") -> None:
    """The note for a spelling that still works for one release."""
    note(f"{old} is deprecated; use {new}{f' ({why})' if why else ''}")


def usage(message: str, option: str) -> NoReturn:
    """Stops the command with a usage error (exit 2) that names the option."""
    raise typer.BadParameter(message, param_hint=f"'{option}'")


def connect(address: str, token: str | None, timeout: float) -> Client:
    """The client every command uses: one deadline for each of its calls."""
    return Client(address, token=token, timeout=timeout)


def checked_out(out: Path | None) -> Path | None:
    """`out`, once its directory is known to exist."""
    if out is not None and not out.resolve().parent.is_dir():
        usage(f"the directory of {out} does not exist", "--out")
    return out


class Precision(str, Enum):
    """How the forward pass runs on the server."""

    full = "full"
    bfloat16 = "bfloat16"


Model = Annotated[
    str, typer.Argument(metavar="MODEL", help="The model's name, as `gradtap models` lists it.")
]
Address = Annotated[
    str,
    typer.Option(
        "--address",
        "-a",
        envvar="GRADTAP_ADDRESS",
        metavar="HOST:PORT",
        help="The server: host:port, or any gRPC target such as dns:///gradtap.svc:50051.",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        envvar="GRADTAP_TOKEN", metavar="TOKEN", help="Bearer token sent with every call."
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        min=0,
        metavar="SECONDS",
        help="Deadline of each call, in seconds: by default the server's default "
        "--max-call-seconds, the longest a call may run there.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Inputs = Annotated[
    list[Path] | None,
    typer.Option(
        "--input",
        "-i",
        exists=True,
        dir_okay=False,
        metavar="FILE.npy",
        help="The model's next input, saved with np.save; give one per model input, in "
        "order. Without any, seeded random inputs are used (see --input-seed).",
    ),
]
InputSeed = Annotated[
    int | None,
    typer.Option(
        "--input-seed", metavar="N", help="Seed of the random inputs used without --input [0]."
    ),
]
Digest = Annotated[
    str | None,
    typer.Option(
        metavar="DIGEST",
        help="Fail unless the served model has this digest (sha256:..., see `gradtap models`).",
    ),
]
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a version may be (and it never holds ".."): the server's rule, checked before sending."""


def checked_version(value: str | None) -> str | None:
    """--version, when it is a version the server could have."""
    if value is not None and (not VERSION.fullmatch(value) or ".." in value):
        raise typer.BadParameter(f"a version matches {VERSION.pattern} without '..'")
    return value


ModelVersion = Annotated[
    str | None,
    typer.Option(
        "--version",
        metavar="VERSION",
        callback=checked_version,
        help="The model version to use (see `gradtap models`); without it, the default "
        "version: the newest ready one, unless an operator pinned another.",
    ),
]
PrecisionOption = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="full, or bfloat16 to run the forward pass under bf16 autocast (faster on GPUs; "
        "about 3 significant digits).",
    ),
]
ParamGrads = Annotated[
    list[str] | None,
    typer.Option(
        "--param-grads",
        metavar="NAME",
        help="Also return the gradient of this parameter (a state-dict name, see "
        "`gradtap describe`), or * for all; repeatable. Saved as param_grad/NAME.",
    ),
]
Targets = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        "-t",
        metavar="NAME",
        help="A node (a graph-node name or module path, see `gradtap describe`) whose "
        "gradient to return; repeatable.",
    ),
]
InputGrads = Annotated[
    bool, typer.Option("--input-grads", help="Also return the gradient of each float input.")
]
Activations = Annotated[
    bool, typer.Option("--activations", help="Also return each target's activation.")
]
ObjectiveOutput = Annotated[
    str,
    typer.Option(
        metavar="N|NAME",
        help="The model output the objective is taken at: its position, or its name as "
        "`gradtap describe` lists it (e.g. logits).",
    ),
]


def output_choice(text: str, option: str) -> int | str:
    """--objective-output / --output: a position (0, 1...) or an output's name (logits)."""
    text = text.strip()
    if not text:
        usage("give an output's position or name", option)
    return int(text) if text.isdigit() else text


ObjectiveNode = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="Take the objective at this node instead."),
]


def out_option(keys: str) -> Any:
    """--out FILE.npz, whose keys the command names in `keys`."""
    return typer.Option(
        "--out", dir_okay=False, metavar="FILE.npz", help=f"Save the result here: {keys}."
    )


def plot_option(what: str) -> Any:
    """--plot FILE.png: `what` the picture shows."""
    return typer.Option(
        "--plot",
        dir_okay=False,
        metavar="FILE.png",
        help=f"Also draw the result as a PNG (needs the plot extra): {what}",
    )


def hidden(*names: str, **checks: Any) -> Any:
    """A deprecated option: accepted, left out of --help, and noted when used."""
    return typer.Option(*names, hidden=True, **checks)

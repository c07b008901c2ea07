"""The gradtap command line: serve models, list and describe them, analyze inputs, check health."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import ml_dtypes
import numpy as np
import typer

from gradtap import _cli_attribution, _cli_many

if TYPE_CHECKING:
    # mypy runs over the source tree, where gradtap.client is the top-level client/ package:
    # pyproject's package-dir mapping lives in the editable install's import hook, which mypy
    # cannot follow. At run time the names come from the installed gradtap.client.
    from client import Client, GradtapError, Objective, Result, TensorSpec
else:
    from gradtap.client import Client, GradtapError, Objective, Result, TensorSpec

DEFAULT_ADDRESS = "127.0.0.1:50051"
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
OBJECTIVE_SPECS = (
    "sum | logit:K[,K...] | cross_entropy:L[,L...] | mse:FILE.npy | grad_outputs:FILE.npy | none"
)
PREVIEW = 4
"""How many leading values of each returned tensor the summary shows."""

app = typer.Typer(
    name="gradtap",
    help="Activations and gradients of a PyTorch model's intermediate nodes, over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

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
Model = Annotated[
    str, typer.Argument(metavar="MODEL", help="The model's name, as `gradtap models` lists it.")
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class Device(str, Enum):
    """Where the server runs its models."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _note(message: str) -> None:
    typer.echo(f"note: {message}", err=True)


def _usage(message: str, option: str) -> NoReturn:
    raise typer.BadParameter(message, param_hint=f"'{option}'")


def _shape(shape: Sequence[int | None]) -> str:
    """(?, 3, 28, 28): a shape as Python writes a tuple, with ? for a dynamic dimension."""
    dims = ["?" if d is None else str(d) for d in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        (indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths))).rstrip() for row in rows
    )


def _short(digest: str) -> str:
    algorithm, _, value = digest.rpartition(":")
    return f"{algorithm}:{value[:12]}" if algorithm else value[:12]


def _numpy_dtype(name: str) -> np.dtype[Any]:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _load_npy(path: Path, option: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        _usage(f"{path} is not a readable .npy file: {e}", option)
    if not isinstance(array, np.ndarray):  # an .npz archive
        _usage(f"{path} is an .npz archive; save one array per file with np.save", option)
    return array


def _ints(text: str, kind: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        _usage(f"{kind} takes comma-separated integers, e.g. {kind}:3 or {kind}:0,3", "--objective")
    return values


def parse_objective(spec: str, output: int, node: str | None) -> Objective | None:
    """An Objective from SPEC (see OBJECTIVE_SPECS); None for `none`."""
    kind, colon, argument = spec.strip().partition(":")
    kind = kind.strip().lower().replace("-", "_")
    if kind in ("sum", "none"):
        if colon:
            _usage(f"{kind} takes no argument, got {spec!r}", "--objective")
        return Objective.sum(output, node) if kind == "sum" else None
    if kind in ("logit", "cross_entropy", "mse", "grad_outputs") and not argument.strip():
        example = f"{kind}:3" if kind in ("logit", "cross_entropy") else f"{kind}:FILE.npy"
        _usage(f"{kind} needs an argument, e.g. {example}", "--objective")
    if kind == "logit":
        return Objective.logit(_ints(argument, kind), output, node)
    if kind == "cross_entropy":
        return Objective.cross_entropy(_ints(argument, kind), output, node)
    if kind in ("mse", "grad_outputs"):
        path = Path(argument.strip())
        if not path.is_file():
            _usage(f"{kind}: file {path} does not exist", "--objective")
        array = _load_npy(path, "--objective")
        if kind == "mse":
            return Objective.mse(array, output, node)
        return Objective.grad_outputs(array, output, node)
    _usage(f"unknown objective {spec!r}; use one of: {OBJECTIVE_SPECS}", "--objective")


def random_inputs(specs: Sequence[TensorSpec], seed: int) -> list[np.ndarray]:
    """One seeded input per spec: dynamic dimensions at their smallest size (at least 1);
    floats standard normal, booleans True, integers 0."""
    rng = np.random.default_rng(seed)
    arrays: list[np.ndarray] = []
    for i, spec in enumerate(specs):
        shape = tuple(
            max(1, spec.min_shape[d] if d < len(spec.min_shape) else 1) if size is None else size
            for d, size in enumerate(spec.shape)
        )
        if spec.dtype in FLOAT_DTYPES:
            array = rng.standard_normal(shape).astype(_numpy_dtype(spec.dtype))
            how = "standard normal"
        elif spec.dtype == "bool":
            array, how = np.ones(shape, dtype=np.bool_), "all True"
        else:
            array, how = np.zeros(shape, dtype=_numpy_dtype(spec.dtype)), "all zeros"
        _note(
            f"no --input: inputs[{i}] is random {spec.dtype} {_shape(shape)}, {how} (seed {seed})"
        )
        arrays.append(array)
    return arrays


def matched_inputs(arrays: list[np.ndarray], specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """Casts float inputs to the float dtype the model wants; leaves every other dtype alone
    so that the server names a mismatch."""
    matched = list(arrays)
    for i, (array, spec) in enumerate(zip(arrays, specs)):
        given = array.dtype.name
        if given != spec.dtype and given in FLOAT_DTYPES and spec.dtype in FLOAT_DTYPES:
            _note(f"inputs[{i}]: cast {given} to {spec.dtype}, the dtype the model takes")
            matched[i] = array.astype(_numpy_dtype(spec.dtype))
    return matched


def _number(value: float) -> str:
    return f"{value:.4g}"


def tensor_row(kind: str, name: str, array: np.ndarray) -> list[str]:
    """kind, name, shape, dtype, min, max, mean, L2 norm and the first values of one tensor."""
    row = [kind, name, _shape(array.shape), array.dtype.name]
    if array.size == 0:
        return [*row, "-", "-", "-", "-", "[]"]
    values = array.astype(np.float64).ravel()
    first = ", ".join(_number(v) for v in values[:PREVIEW])
    more = ", ..." if values.size > PREVIEW else ""
    return [
        *row,
        _number(values.min()),
        _number(values.max()),
        _number(values.mean()),
        _number(float(np.linalg.norm(values))),
        f"[{first}{more}]",
    ]


def named_arrays(result: Result) -> dict[str, np.ndarray]:
    """Every returned tensor keyed kind/name (gradient/relu_1, output/0), as --out saves them."""
    arrays: dict[str, np.ndarray] = {}
    for name, array in result.gradients.items():
        arrays[f"gradient/{name}"] = array
    for name, array in result.activations.items():
        arrays[f"activation/{name}"] = array
    for index, array in sorted(result.input_grads.items()):
        arrays[f"input_grad/{index}"] = array
    for index, array in enumerate(result.outputs):
        arrays[f"output/{index}"] = array
    for name, array in result.param_grads.items():
        arrays[f"param_grad/{name}"] = array
    for name, array in result.topk_indices.items():
        arrays[f"topk_indices/{name}"] = array
    return arrays


def summary(result: Result, objective: Objective | None) -> str:
    meta = result.metadata
    t = meta.get("timings", {})
    timings = ", ".join(
        f"{key} {t[f'{key}_ms']:.2f} ms"
        for key in ("decode", "forward", "backward", "collect", "total")
        if f"{key}_ms" in t
    )
    if objective is None:
        objective_text, loss = "none", "-"
    else:
        which = objective.message.WhichOneof("kind") or "?"
        site = getattr(objective.message, which).site
        where = f"node {site.node}" if site.node else f"output {site.output}"
        objective_text, loss = f"{which} at {where}", f"{result.loss:.6g}"
    header = _table(
        [
            ["model", f"{meta.get('model', '?')} ({_short(meta.get('model_digest', ''))})"],
            ["device", str(meta.get("device", "?"))],
            ["objective", objective_text],
            ["loss", loss],
            ["timings", timings],
            ["received", f"{meta.get('bytes_received', 0) / 1024:.1f} KiB"],
        ]
    )
    rows = [["KIND", "NAME", "SHAPE", "DTYPE", "MIN", "MAX", "MEAN", "L2", "FIRST"]]
    for key, array in named_arrays(result).items():
        kind, _, name = key.partition("/")
        rows.append(tensor_row(kind, name, array))
    return header + "\n\n" + _table(rows)


def save(result: Result, out: Path) -> int:
    """Writes the result as an .npz at exactly `out`; returns how many arrays it holds."""
    arrays: dict[str, Any] = dict(named_arrays(result))
    for key, array in arrays.items():
        if array.dtype == ml_dtypes.bfloat16:  # .npy cannot describe bfloat16
            _note(f"{key}: saved bfloat16 as float32")
            arrays[key] = array.astype(np.float32)
    arrays["loss"] = np.asarray(result.loss, dtype=np.float64)
    with out.open("wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    return len(arrays)


def _file_option(help: str) -> Any:
    """An option naming an existing, readable file."""
    return typer.Option(exists=True, dir_okay=False, readable=True, metavar="FILE", help=help)


@app.command()
def serve(
    host: Annotated[
        str,
        typer.Option(metavar="HOST", help="Interface to listen on; 0.0.0.0 for every IPv4 one."),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, metavar="PORT", help="Port to listen on; 0 picks a free one."
        ),
    ] = 50051,
    device: Annotated[
        Device, typer.Option(help="Where models run; auto picks CUDA when torch sees it.")
    ] = Device.auto,
    model_repository: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            dir_okay=True,
            readable=True,
            metavar="DIR",
            help="A directory of exported models (NAME.pt2, from torch.export.save) to serve.",
        ),
    ] = None,
    no_builtins: Annotated[
        bool,
        typer.Option(
            "--no-builtins",
            help="Do not load the built-in seed models (seed-encoder, seed-convnet, seed-mlp).",
        ),
    ] = False,
    max_workers: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Threads for the calls outside admission (health, ListModels, DescribeModel); "
            "admitted calls get max-concurrent-requests + max-queue threads more.",
        ),
    ] = 8,
    grace: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="How long calls in flight may finish after SIGTERM or Ctrl-C.",
        ),
    ] = 10.0,
    max_concurrent_requests: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Analyze, AnalyzeMany, Attribute and Perturb calls that run at once; keep it "
            "at least --max-batch-size, or batches cannot fill.",
        ),
    ] = 16,
    max_queue: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="Calls that may wait for a place; past it calls fail with RESOURCE_EXHAUSTED "
            "and a retry delay.",
        ),
    ] = 32,
    max_call_seconds: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="The longest a call may take from its arrival, whatever the client's deadline.",
        ),
    ] = 300.0,
    tls_cert: Annotated[
        Path | None,
        _file_option("PEM certificate chain: serve TLS (with --tls-key)."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        _file_option("PEM private key of --tls-cert."),
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        _file_option("PEM CA bundle: require client certificates it signed (mutual TLS)."),
    ] = None,
    auth_token_file: Annotated[
        Path | None,
        _file_option("Require a bearer token from this file on every call (docs/operations.md)."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics.",
        ),
    ] = None,
    max_batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Rows that concurrent compatible Analyze calls may share in one pass; "
            "1 turns dynamic batching off.",
        ),
    ] = 16,
    batch_timeout_us: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="MICROSECONDS",
            help="How long the first call of a batch waits for companions (only while calls "
            "overlap; a lone call never waits).",
        ),
    ] = 2000,
    max_result_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="BYTES",
            help="Refuse, before any work, a call whose result would be larger.",
        ),
    ] = 2 << 30,
    shared_memory: Annotated[
        bool,
        typer.Option(
            "--shared-memory",
            help="Let callers on this host have Analyze results written into shared memory "
            "they created, instead of streamed (docs/shared-memory.md).",
        ),
    ] = False,
    otel: Annotated[
        bool,
        typer.Option(
            "--otel",
            help="Trace every call with OpenTelemetry (needs the otel extra; configure the "
            "exporter the OpenTelemetry way, e.g. with opentelemetry-instrument).",
        ),
    ] = False,
) -> None:
    """Run the server (needs the server extra, with torch).

    Serves the built-in seed models and any exported models in --model-repository until
    SIGTERM or Ctrl-C, then drains the calls in flight within --grace seconds.
    """
    try:
        if TYPE_CHECKING:
            from server import app as server
        else:
            from gradtap.server import app as server
    except ImportError as e:
        typer.echo('gradtap serve needs the server extra: pip install "gradtap[server]"', err=True)
        typer.echo(f"  ({e})", err=True)
        raise typer.Exit(2) from None
    if no_builtins and model_repository is None:
        _usage("without the built-in models, name a --model-repository to serve", "--no-builtins")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        server.resolve_device(device.value)
        if not max_call_seconds > 0:
            raise ValueError("--max-call-seconds must be more than 0")
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    settings = server.Settings(
        device=device.value,
        model_repository=model_repository,
        builtins=not no_builtins,
        max_workers=max_workers,
        grace_seconds=grace,
        max_concurrent_requests=max_concurrent_requests,
        max_queue=max_queue,
        max_call_seconds=max_call_seconds,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_token_file=auth_token_file,
        metrics_port=metrics_port,
        max_batch_size=max_batch_size,
        batch_timeout_us=batch_timeout_us,
        max_result_bytes=max_result_bytes,
        shared_memory=shared_memory,
        tracing=otel,
    )
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        server.serve(f"{bracketed}:{port}", settings)
    except (OSError, RuntimeError) as e:  # grpc raises RuntimeError when the port is taken
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except ValueError as e:  # a malformed token file, TLS flags that do not go together
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def models(
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Deadline of the call.")] = 30.0,
    as_json: Json = False,
) -> None:
    """List the served models: name, source and digest."""
    with Client(address, token=token, timeout=timeout) as client:
        infos = client.list_models()
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(m) for m in infos], indent=2))
        return
    rows = [["NAME", "SOURCE", "DIGEST"]] + [[m.name, m.source, m.digest] for m in infos]
    typer.echo(_table(rows))


def _specs_table(specs: Sequence[TensorSpec]) -> str:
    rows = [["INDEX", "DTYPE", "SHAPE", "DYNAMIC"]]
    for i, spec in enumerate(specs):
        dynamic = []
        for d, size in enumerate(spec.shape):
            if size is None:
                low = spec.min_shape[d] if d < len(spec.min_shape) else 0
                high = spec.max_shape[d] if d < len(spec.max_shape) else None
                dynamic.append(f"dim {d}: {low}..{'' if high is None else high}")
        rows.append([str(i), spec.dtype, _shape(spec.shape), ", ".join(dynamic)])
    return _table(rows, indent="  ")


@app.command()
def describe(
    model: Model,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Deadline of the call.")] = 30.0,
    as_json: Json = False,
) -> None:
    """Show a model's inputs, outputs, modules and nodes.

    Shapes show ? for a dynamic dimension. Any node name or module path listed here can be
    passed to `gradtap analyze --target`.
    """
    with Client(address, token=token, timeout=timeout) as client:
        d = client.describe(model)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(d), indent=2))
        return
    modules = [[path, "->", node] for path, node in d.modules.items()]
    nodes = [["NAME", "OP", "DTYPE", "SHAPE", "DIFFERENTIABLE"]] + [
        [n.name, n.op, n.dtype, _shape(n.shape), "yes" if n.differentiable else "no"]
        for n in d.nodes
    ]
    sections = [
        _table([["model", d.name], ["source", d.source], ["digest", d.digest]]),
        "inputs\n" + _specs_table(d.inputs),
        "outputs\n" + _specs_table(d.outputs),
        "modules (path -> node)\n" + (_table(modules, indent="  ") or "  (none)"),
        "nodes\n" + _table(nodes, indent="  "),
        f"parameters: {len(d.parameters)}",
    ]
    typer.echo("\n\n".join(sections))


@app.command()
def analyze(
    model: Model,
    inputs: Annotated[
        list[Path] | None,
        typer.Option(
            "--input",
            "-i",
            exists=True,
            dir_okay=False,
            metavar="FILE.npy",
            help="The model's next input, saved with np.save; give one per model input, in "
            "order. Without any, seeded random inputs are used.",
        ),
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            "-t",
            metavar="NAME",
            help="A node name or module path (see `gradtap describe`) whose gradient to "
            "return; repeatable.",
        ),
    ] = None,
    objective_spec: Annotated[
        str | None,
        typer.Option(
            "--objective",
            metavar="SPEC",
            help=f"The scalar to differentiate: {OBJECTIVE_SPECS}. logit takes one index for "
            "every row or one per row; cross_entropy one label per row. Default: sum when "
            "--target, --input-grad or --objective-node is given.",
            show_default=False,
        ),
    ] = None,
    objective_output: Annotated[
        int, typer.Option(min=0, metavar="N", help="The model output the objective is taken at.")
    ] = 0,
    objective_node: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", help="Take the objective at this node or module path instead."
        ),
    ] = None,
    input_grad: Annotated[
        bool, typer.Option("--input-grad", help="Also return the gradient of each float input.")
    ] = False,
    activations: Annotated[
        bool, typer.Option("--activations", help="Also return each target's activation.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            metavar="FILE.npz",
            help="Save every returned array, keyed gradient/NAME, activation/NAME, "
            "input_grad/I, output/I, plus loss.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(metavar="N", help="Seed for the random inputs used without --input.")
    ] = 0,
    inputs_dir: Annotated[
        Path | None,
        typer.Option(
            "--inputs-dir",
            exists=True,
            file_okay=False,
            dir_okay=True,
            metavar="DIR",
            help="Analyze every item in DIR over one stream, in name order, with a progress "
            "bar: NAME.npy holds a one-input model's input, NAME.npz the inputs in order. "
            "Writes NAME.npz per item into --out-dir.",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            file_okay=False,
            metavar="DIR",
            help="Where --inputs-dir writes one .npz per item, keyed as --out; created if missing.",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            dir_okay=False,
            metavar="FILE.png",
            help="Also draw the result as a PNG (needs the plot extra): with --input-grad the "
            "input gradient over the input, else the first target's gradient.",
        ),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Deadline of the call; none by default.")
    ] = None,
) -> None:
    """Compute gradients and activations at named nodes.

    Runs one forward and backward pass on the server, then prints the loss, the timings and
    one line per returned tensor: shape, dtype, min, max, mean, L2 norm and first values.

    \b
    Example, with `make serve` running:
      gradtap analyze seed-convnet --target relu_1 --objective cross_entropy:3 --input-grad
      gradtap analyze seed-convnet --input x.npy --target relu_1 --target conv2 \\
          --objective cross_entropy:3 --activations --out result.npz
    """
    targets = targets or []
    if objective_spec is None and (targets or input_grad or objective_node is not None):
        site = f"node {objective_node}" if objective_node else f"output {objective_output}"
        _note(f"no --objective: using sum, the sum of every element of {site}")
        objective_spec = "sum"
    objective = (
        parse_objective(objective_spec, objective_output, objective_node)
        if objective_spec is not None
        else None
    )
    if out is not None and not out.resolve().parent.is_dir():
        _usage(f"the directory of {out} does not exist", "--out")
    if inputs_dir is not None or out_dir is not None:
        for given, option in ((inputs, "--input"), (out, "--out"), (plot, "--plot")):
            if given:
                _usage(f"{option} takes a single analysis; drop it with --inputs-dir", option)
        if inputs_dir is None or out_dir is None:
            _usage("--inputs-dir and --out-dir go together", "--inputs-dir")
        with Client(address, token=token, timeout=timeout) as client:
            count = _cli_many.analyze_dir(
                client,
                model,
                inputs_dir,
                out_dir,
                targets,
                objective,
                input_grad=input_grad,
                activations=activations,
            )
        typer.echo(f"wrote {count} results to {out_dir}")
        return
    if plot is not None and not (targets or input_grad):
        _usage("there is nothing to draw: give --input-grad or a --target", "--plot")
    arrays = [_load_npy(path, "--input") for path in inputs or []]
    with Client(address, token=token, timeout=timeout) as client:
        description = client.describe(model)
        if not arrays:
            arrays = random_inputs(description.inputs, seed)
        arrays = matched_inputs(arrays, description.inputs)
        try:
            result = client.analyze(
                model,
                arrays,
                targets,
                objective,
                input_grads=input_grad,
                activations=activations,
            )
        except ValueError as e:  # an input the wire cannot carry, e.g. complex or object arrays
            _usage(str(e), "--input")
    typer.echo(summary(result, objective))
    if out is not None:
        count = save(result, out)
        typer.echo(f"\nwrote {count} arrays to {out}")
    if plot is not None:
        image = arrays[0] if 0 in result.input_grads else None
        try:
            written = result.plot(plot, image=image)
        except (ImportError, ValueError) as e:
            _usage(str(e), "--plot")
        typer.echo(f"wrote a picture to {written}")


@app.command()
def health(
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Deadline of the check.")] = 3.0,
) -> None:
    """Check the server's health; exit 0 only when SERVING.

    Prints SERVING, NOT_SERVING, ... or, when the server cannot be reached, the error.
    """
    with Client(address, token=token, timeout=timeout) as client:
        status = client.health(timeout=timeout)
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(1)


class AttributionMethod(str, Enum):
    """Attribution methods, named as Captum's classes in snake case."""

    saliency = "saliency"
    input_x_gradient = "input_x_gradient"
    integrated_gradients = "integrated_gradients"
    smoothgrad = "smoothgrad"
    guided_backprop = "guided_backprop"
    layer_gradient_x_activation = "layer_gradient_x_activation"
    layer_grad_cam = "layer_grad_cam"
    layer_integrated_gradients = "layer_integrated_gradients"
    layer_conductance = "layer_conductance"


@app.command()
def attribute(
    model: Model,
    method: Annotated[
        AttributionMethod, typer.Argument(metavar="METHOD", help="The attribution method.")
    ],
    inputs: Annotated[
        list[Path] | None,
        typer.Option(
            "--input",
            "-i",
            exists=True,
            dir_okay=False,
            metavar="FILE.npy",
            help="The model's next input, saved with np.save; give one per model input, in "
            "order. Without any, seeded random inputs are used.",
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            metavar="K[,K...]",
            help="The class to attribute, as Captum's target: one index for every row, or "
            "one per row.",
        ),
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="For layer methods: a node name or module path (see `gradtap describe`).",
        ),
    ] = None,
    output: Annotated[
        int, typer.Option(min=0, metavar="N", help="The model output attributed.")
    ] = 0,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="NAME=VALUE",
            help="A parameter of the method, with Captum's name: n_steps=20, "
            "method=riemann_trapezoid, baselines=0 or baselines=FILE.npy, "
            "internal_batch_size=64, nt_samples=10, stdevs=0.2, seed=0, abs=false, "
            "relu_attributions=true, ...; repeatable.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(dir_okay=False, metavar="FILE.npy", help="Save the attribution here."),
    ] = None,
    seed: Annotated[
        int, typer.Option(metavar="N", help="Seed for the random inputs used without --input.")
    ] = 0,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Deadline of the call; none by default.")
    ] = None,
) -> None:
    """Attribute an output to the input, or to a layer, with a Captum method.

    Prints the attribution's shape, dtype, min, max, mean, L2 norm and first values.

    \b
    Example, with `make serve` running:
      gradtap attribute seed-convnet integrated_gradients --target 3 -p n_steps=32
      gradtap attribute seed-convnet layer_grad_cam --target 3 --layer conv2 --out cam.npy
    """
    options = _cli_attribution.parse_params(params or [])
    targets = _cli_attribution.parse_targets(target)
    if out is not None and not out.resolve().parent.is_dir():
        _usage(f"the directory of {out} does not exist", "--out")
    arrays = [_load_npy(path, "--input") for path in inputs or []]
    with Client(address, token=token, timeout=timeout) as client:
        description = client.describe(model)
        if not arrays:
            arrays = random_inputs(description.inputs, seed)
        arrays = matched_inputs(arrays, description.inputs)
        try:
            if "method" in options:  # Captum's name for the integration rule
                options["integration_method"] = options.pop("method")
            attribution = client.attribute(
                model, arrays, method.value, index=targets, node=layer, output=output, **options
            ).attribution
        except (TypeError, ValueError) as e:  # a parameter the wire cannot carry
            _usage(str(e), "--param")
    where = f"layer {layer}" if layer else "input"
    header = _table(
        [
            ["model", model],
            ["method", method.value],
            ["target", target if target is not None else "-"],
            ["attributed to", where],
        ]
    )
    rows = [["KIND", "NAME", "SHAPE", "DTYPE", "MIN", "MAX", "MEAN", "L2", "FIRST"]]
    rows.append(tensor_row("attribution", layer or "input", attribution))
    typer.echo(header + "\n\n" + _table(rows))
    if out is not None:
        _cli_attribution.save_array(attribution, out)
        typer.echo(f"\nwrote the attribution to {out}")


class PerturbMethod(str, Enum):
    """Adversarial loops."""

    fgsm = "fgsm"
    pgd = "pgd"


class Norm(str, Enum):
    """The norm of PGD's ball."""

    Linf = "Linf"
    L2 = "L2"


@app.command()
def perturb(
    model: Model,
    objective_spec: Annotated[
        str,
        typer.Option(
            "--objective",
            metavar="SPEC",
            help=f"The loss the steps follow: {OBJECTIVE_SPECS.removesuffix(' | none')}.",
        ),
    ],
    epsilon: Annotated[
        float,
        typer.Option(min=0, metavar="EPS", help="FGSM: the step size. PGD: the ball's radius."),
    ],
    inputs: Annotated[
        list[Path] | None,
        typer.Option(
            "--input",
            "-i",
            exists=True,
            dir_okay=False,
            metavar="FILE.npy",
            help="The model's next input, saved with np.save; give one per model input, in "
            "order. Without any, seeded random inputs are used.",
        ),
    ] = None,
    method: Annotated[PerturbMethod, typer.Option(help="FGSM (one step) or PGD.")] = (
        PerturbMethod.fgsm
    ),
    objective_output: Annotated[
        int, typer.Option(min=0, metavar="N", help="The model output the objective is taken at.")
    ] = 0,
    objective_node: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", help="Take the objective at this node or module path instead."
        ),
    ] = None,
    step_size: Annotated[
        float | None, typer.Option(min=0, metavar="ALPHA", help="PGD: the size of each step.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="PGD: the number of steps.")
    ] = None,
    norm: Annotated[Norm, typer.Option(help="PGD: the norm of the ball.")] = Norm.Linf,
    targeted: Annotated[
        bool,
        typer.Option(
            "--targeted", help="Descend the objective instead of ascending it (a targeted attack)."
        ),
    ] = False,
    clamp: Annotated[
        str | None,
        typer.Option(metavar="LO,HI", help="Bounds of the input's values, e.g. 0,1 or ,1."),
    ] = None,
    random_start: Annotated[
        bool, typer.Option("--random-start", help="PGD: start from a random point of the ball.")
    ] = False,
    start_seed: Annotated[
        int | None, typer.Option(min=0, metavar="N", help="Seed of the random start.")
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            metavar="FILE.npy",
            help="0/1 array shaped like the input: which elements may move.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(dir_okay=False, metavar="FILE.npy", help="Save the perturbed input here."),
    ] = None,
    seed: Annotated[
        int, typer.Option(metavar="N", help="Seed for the random inputs used without --input.")
    ] = 0,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Deadline of the call; none by default.")
    ] = None,
) -> None:
    """Perturb the input to raise an objective (or lower it, --targeted), on the server.

    Shows a progress bar with each step's loss, then the objective before and after and
    how far the input moved.

    \b
    Example, with `make serve` running (the seed's adversarial example, as PGD):
      gradtap perturb seed-mlp --objective mse:target.npy --objective-node relu_1 \\
          --method pgd --epsilon 0.05 --step-size 0.01 --steps 20 --out adversarial.npy
    """
    objective = parse_objective(objective_spec, objective_output, objective_node)
    if objective is None:
        _usage("perturb needs an objective to follow", "--objective")
    bounds = _cli_attribution.parse_clamp(clamp)
    if out is not None and not out.resolve().parent.is_dir():
        _usage(f"the directory of {out} does not exist", "--out")
    arrays = [_load_npy(path, "--input") for path in inputs or []]
    mask_array = _load_npy(mask, "--mask") if mask is not None else None
    with Client(address, token=token, timeout=timeout) as client:
        description = client.describe(model)
        if not arrays:
            arrays = random_inputs(description.inputs, seed)
        arrays = matched_inputs(arrays, description.inputs)
        total = (steps or 0) if method == PerturbMethod.pgd else 1
        with _cli_attribution.progress(total, model) as on_step:
            result = client.perturb(
                model,
                arrays,
                method.value,
                objective,
                epsilon=epsilon,
                step_size=step_size,
                steps=steps,
                norm=norm.value,
                targeted=targeted,
                clamp=bounds,
                random_start=random_start,
                seed=start_seed,
                mask=mask_array,
                on_step=on_step,
            )
    floating = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
    rows = [
        ["model", model],
        ["method", method.value + (f" ({norm.value})" if method == PerturbMethod.pgd else "")],
        ["objective before", f"{result.objective_before:.6g}"],
        ["objective after", f"{result.objective_after:.6g}"],
        ["steps", str(len(result.losses))],
    ]
    if floating:
        rows += _cli_attribution.perturbation_rows(floating[0], result.adversarial)
    typer.echo(_table(rows))
    if out is not None:
        _cli_attribution.save_array(result.adversarial, out)
        typer.echo(f"\nwrote the perturbed input to {out}")


def main() -> None:
    """The `gradtap` entry point: a failed call prints its code, message and field; exit 1."""
    try:
        app(prog_name="gradtap")
    except GradtapError as e:
        typer.echo(f"error: {e.code.name}: {e.message}", err=True)
        if e.field:
            typer.echo(f"  field: {e.field}", err=True)
        if e.reason:
            typer.echo(f"  reason: {e.reason}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

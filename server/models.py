"""Where models come from: the built-in seed zoo and a repository of torch.export archives.

Archives are untrusted files. `torch.export.load` alone would unpickle sample inputs and
pickled weights, evaluate symbolic-shape strings with sympy, and run any `torch.*` callable
a graph names. `load_archive` closes each of those doors before torch sees the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import operator
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from .errors import ModelLoadError

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Every model name matches this; names are looked up in a dict, never joined into paths."""

MAX_BATCH = 4096
"""Largest batch the built-in models accept."""


# ---------------------------------------------------------------------------------------------
# The built-in zoo: the three networks of the seed examples.


class SeedEncoder(nn.Module):
    """Seed example 1: a conv encoder, `modified_z = latent_z.mean(dim=[2, 3]) * 2`, a decoder.

    `modified_z` is the graph node `mul`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 16, kernel_size=3)
        self.decoder = nn.Linear(16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        latent_z = self.encoder(image)
        modified_z = latent_z.mean(dim=[2, 3]) * 2
        return self.decoder(modified_z)  # type: ignore[no-any-return]


class SeedConvNet(nn.Module):
    """Seed example 2 (`MyModel`): returns `(logits, intermediate)`; `intermediate` is `relu_1`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.fc = nn.Linear(64 * 24 * 24, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.conv1(x))
        intermediate = F.relu(self.conv2(x))
        x = intermediate.view(x.size(0), -1)
        x = self.fc(x)
        return x, intermediate


class SeedMLP(nn.Module):
    """Seed example 3 (`SimpleNet`): returns `(logits, intermediate)`, `intermediate` = `relu_1`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.fc1(x))
        intermediate = F.relu(self.fc2(x))
        x = self.fc3(intermediate)
        return x, intermediate


BUILTINS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "seed-encoder": (SeedEncoder, (3, 28, 28)),
    "seed-convnet": (SeedConvNet, (3, 28, 28)),
    "seed-mlp": (SeedMLP, (784,)),
}
"""Name -> (module class, per-sample input shape). The batch dimension is dynamic."""


def builtin_module(name: str) -> nn.Module:
    """Builds a built-in model with its fixed weights (seed 0), in eval mode."""
    cls, _ = BUILTINS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls().eval()


def export_builtin(name: str) -> ExportedProgram:
    """Exports a built-in model with a dynamic batch dimension, as a user would."""
    module = builtin_module(name)
    _, sample_shape = BUILTINS[name]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, *sample_shape)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


# ---------------------------------------------------------------------------------------------
# Safe loading of archives.

_SYMPY_WORDS = frozenset(
    {
        # sympy classes and constants that srepr/str of shape expressions use
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "sqrt",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "Piecewise",
        "ITE",
        "true",
        "false",
        "True",
        "False",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "One",
        "Zero",
        "NegativeOne",
        "Half",
        "I",
        # torch.utils._sympy.functions
        "CeilDiv",
        "CeilToInt",
        "CleanDiv",
        "FloatPow",
        "FloatTrueDiv",
        "FloorDiv",
        "FloorToInt",
        "Identity",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "LShift",
        "ModularIndexing",
        "PowByNatural",
        "PythonMod",
        "RShift",
        "RoundDecimal",
        "RoundToInt",
        "ToFloat",
        "TruncToFloat",
        "TruncToInt",
        "Where",
        # assumptions passed to Symbol(...)
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "zero",
        "nonzero",
        "commutative",
        "extended_real",
        "rational",
    }
)
_SYM_TOKEN = re.compile(
    r"\s+"
    r"|'[a-z]{1,8}[0-9]{1,9}'"  # a quoted symbol name, e.g. 's77'
    r"|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"  # a number
    r"|[A-Za-z][A-Za-z0-9_]*"  # a word, checked against the allow-list below
    r"|[-+*/%(),=<>!&|~]"  # operators and punctuation; no '.', '[', quotes or backslashes
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")


def _check_sym_expr(expr: str) -> None:
    """Refuses a shape expression that could do more than arithmetic when sympy evaluates it."""
    if len(expr) > 4096:
        raise ModelLoadError("a symbolic shape expression is too long")
    pos = 0
    while pos < len(expr):
        m = _SYM_TOKEN.match(expr, pos)
        if m is None:
            raise ModelLoadError(f"unexpected character in a symbolic shape expression: {expr!r}")
        word = m.group()
        if word[0].isalpha() and word not in _SYMPY_WORDS and not _SYMBOL_NAME.fullmatch(word):
            raise ModelLoadError(f"unknown name {word!r} in a symbolic shape expression")
        pos = m.end()


def _walk_expr_strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "expr_str" and isinstance(value, str):
                yield value
            else:
                yield from _walk_expr_strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk_expr_strings(value)


def _check_payload_config(raw: bytes, what: str) -> None:
    config = json.loads(raw)
    for fqn, meta in config.get("config", {}).items():
        if meta.get("use_pickle"):
            raise ModelLoadError(f"{what} {fqn!r} is pickled; only raw tensors are accepted")
        path = str(meta.get("path_name", ""))
        if what == "constant" and not path.startswith("tensor_"):
            raise ModelLoadError(f"constant {fqn!r} is a Python object; only tensors are accepted")


def _sanitized_archive(data: bytes) -> bytes:
    """Checks a torch.export archive and returns a copy torch can load without executing it."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise ModelLoadError("not a zip archive (torch.export.save writes one)") from e
    names = archive.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or not names:
        raise ModelLoadError("an archive must hold exactly one top-level folder")
    root = roots.pop()
    models = [n for n in names if n.startswith(f"{root}/models/") and n.endswith(".json")]
    if models != [f"{root}/models/model.json"]:
        raise ModelLoadError("an archive must hold exactly one program, models/model.json")
    for name in names:
        rel = name[len(root) + 1 :]
        if rel.startswith(("data/aotinductor", "data/weights/model.pt", "data/constants/model.pt")):
            raise ModelLoadError(f"refusing {rel!r}: compiled code or pickled legacy weights")
        if rel.endswith((".so", ".dll", ".dylib", ".pyc", ".py")):
            raise ModelLoadError(f"refusing {rel!r}: archives may not carry code")
    weights_config = f"{root}/data/weights/model_weights_config.json"
    constants_config = f"{root}/data/constants/model_constants_config.json"
    for config, what in ((weights_config, "weight"), (constants_config, "constant")):
        if config not in names:
            raise ModelLoadError(f"missing {config[len(root) + 1 :]}")
        _check_payload_config(archive.read(config), what)

    program = json.loads(archive.read(f"{root}/models/model.json"))
    for expr in _walk_expr_strings(program):
        _check_sym_expr(expr)
    # Guards are Python source that torch would compile into ExportedProgram.module(); the
    # server never calls module(), and drops them so that nothing later can.
    program["guards_code"] = []

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as sanitized:
        for info in archive.infolist():
            rel = info.filename[len(root) + 1 :]
            if rel == "models/model.json":
                payload = json.dumps(program).encode()
            elif rel.startswith("data/sample_inputs/"):
                payload = b""  # torch would unpickle these; the server never needs them
            else:
                payload = archive.read(info.filename)
            sanitized.writestr(info.filename, payload)
    return out.getvalue()


_SAFE_PY_CALLABLES: frozenset[Callable[..., Any]] = frozenset(
    [
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.pos,
        operator.abs,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.and_,
        operator.or_,
        operator.xor,
        operator.not_,
        operator.invert,
        operator.lshift,
        operator.rshift,
        math.floor,
        math.ceil,
        math.trunc,
        math.sqrt,
        torch.sym_int,
        torch.sym_float,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
        torch.sym_ite,
        torch.sym_sqrt,
        torch.sym_sum,
        torch._assert,
        torch._check,
        torch._check_is_size,
    ]
)
_SAFE_HIGHER_ORDER = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
    }
)
_SAFE_OP_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed"})


def _check_graph(program: ExportedProgram) -> None:
    """Refuses graphs that call anything but tensor operators and plain arithmetic."""
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise ModelLoadError(f"node {node.name!r}: unsupported op kind {node.op!r}")
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                if target.namespace not in _SAFE_OP_NAMESPACES:
                    raise ModelLoadError(f"node {node.name!r}: operator {target} is not allowed")
            elif isinstance(target, torch._ops.HigherOrderOperator):
                if target.name() not in _SAFE_HIGHER_ORDER:  # type: ignore[no-untyped-call]
                    raise ModelLoadError(f"node {node.name!r}: operator {target} is not allowed")
            elif target not in _SAFE_PY_CALLABLES:
                raise ModelLoadError(f"node {node.name!r}: call target {target!r} is not allowed")
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.CUSTOM_OBJ, InputKind.TOKEN):
            raise ModelLoadError(
                f"input {spec.arg.name!r}: {spec.kind.name} inputs are unsupported"
            )


OPTIONS_FILE = "gradtap.json"
"""Per-model options an archive may carry: torch.export.save(..., extra_files={OPTIONS_FILE: ...}).

Known keys: {"batching": false} opts the model out of dynamic batching."""


def archive_options(data: bytes) -> dict[str, Any]:
    """The archive's gradtap options (JSON, never code); empty when it has none."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise ModelLoadError("not a zip archive (torch.export.save writes one)") from e
    names = [n for n in archive.namelist() if n.endswith(f"/extra/{OPTIONS_FILE}")]
    if not names:
        return {}
    try:
        options = json.loads(archive.read(names[0]))
    except ValueError as e:
        raise ModelLoadError(f"extra/{OPTIONS_FILE} is not valid JSON") from e
    if not isinstance(options, dict) or not set(options) <= {"batching"}:
        raise ModelLoadError(f"extra/{OPTIONS_FILE} may only set: batching")
    if not isinstance(options.get("batching", True), bool):
        raise ModelLoadError(f"extra/{OPTIONS_FILE}: batching must be true or false")
    return options


def load_archive(data: bytes) -> ExportedProgram:
    """Loads a torch.export archive's bytes without unpickling or evaluating anything in it."""
    sanitized = _sanitized_archive(data)
    try:
        program = torch.export.load(io.BytesIO(sanitized))
    except ModelLoadError:
        raise
    except Exception as e:  # torch's own errors on malformed archives
        raise ModelLoadError(f"torch could not read the archive: {type(e).__name__}") from e
    _check_graph(program)
    return program


# ---------------------------------------------------------------------------------------------
# A loaded model and what callers can target in it.


@dataclass(frozen=True)
class Dim:
    """One dimension of an input or node: a fixed size, or a symbol with a range."""

    size: int | None
    symbol: str = ""
    min: int = 0
    max: int | None = None
    expr: Any = field(default=None, compare=False, repr=False)
    """The sympy expression of a dynamic dimension (e.g. s77, or 2*s77)."""


@dataclass(frozen=True)
class Spec:
    """The dtype and shape of a tensor in the graph."""

    dtype: torch.dtype
    dims: tuple[Dim, ...]


@dataclass(frozen=True)
class NodeInfo:
    """A targetable node of the exported graph."""

    name: str
    op: str
    spec: Spec

    @property
    def differentiable(self) -> bool:
        return self.spec.dtype.is_floating_point or self.spec.dtype.is_complex


@dataclass
class Model:
    """An exported program ready to run: its flat graph, its weights and its metadata."""

    name: str
    source: str
    program: ExportedProgram
    digest: str = ""
    inputs: list[Spec] = field(default_factory=list)
    input_nodes: list[str] = field(default_factory=list)
    outputs: list[Spec] = field(default_factory=list)
    output_positions: list[int] = field(default_factory=list)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)
    """module path -> (module type, node producing its output)."""
    state: list[tuple[str, torch.Tensor, bool]] = field(default_factory=list)
    """The non-user graph inputs in order: (state-dict name, value, is_parameter)."""
    output_nodes: list[str] = field(default_factory=list)
    """The node behind each user output."""
    input_dependent: frozenset[str] = frozenset()
    """Nodes whose value depends on a floating-point user input (so carry its gradient)."""
    batchable: bool = True
    """False when the model opted out of dynamic batching (see server/batching.py)."""


def _dim(size: Any, ranges: dict[Any, Any]) -> Dim:
    if isinstance(size, int):
        return Dim(size=size)
    expr = size.node.expr
    vr = ranges.get(expr)
    lower = int(vr.lower) if vr is not None and vr.lower.is_finite else 0
    upper = int(vr.upper) if vr is not None and vr.upper.is_finite else None
    return Dim(size=None, symbol=str(expr), min=lower, max=upper, expr=expr)


def _spec(value: Any, ranges: dict[Any, Any]) -> Spec | None:
    if not isinstance(value, torch.Tensor):
        return None
    return Spec(dtype=value.dtype, dims=tuple(_dim(s, ranges) for s in value.shape))


def _module_outputs(graph: torch.fx.Graph) -> dict[str, tuple[str, str]]:
    """Maps each module path to the node whose value leaves the module (its output)."""
    members: dict[str, list[torch.fx.Node]] = {}
    types: dict[str, str] = {}
    for node in graph.nodes:
        for path, mtype in (node.meta.get("nn_module_stack") or {}).values():
            path = re.sub(r"@\d+$", "", str(path))
            if not path or path.startswith("_"):
                continue
            members.setdefault(path, []).append(node)
            types[path] = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", "")
    result: dict[str, tuple[str, str]] = {}
    for path, nodes in members.items():
        inside = set(nodes)
        leaving = [
            n
            for n in nodes
            if isinstance(n.meta.get("val"), torch.Tensor)
            and any(user not in inside for user in n.users)
        ]
        if leaving:
            result[path] = (types[path], leaving[-1].name)
    return dict(sorted(result.items()))


def _digest(program: ExportedProgram) -> str:
    """A content digest over the graph and every weight: equal models, equal digests."""
    h = hashlib.sha256()
    h.update(str(program.graph).encode())
    tensors = {**program.state_dict, **program.constants}
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def prepare(name: str, source: str, program: ExportedProgram, device: torch.device) -> Model:
    """Indexes an exported program's graph and moves its weights to `device`."""
    graph = program.graph
    ranges = dict(program.range_constraints)
    signature = program.graph_signature
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    model = Model(name=name, source=source, program=program, digest=_digest(program))

    for spec in signature.input_specs:
        node = placeholders[spec.arg.name]
        if spec.kind == InputKind.USER_INPUT:
            value_spec = _spec(node.meta.get("val"), ranges)
            if value_spec is None:
                raise ModelLoadError(f"input {spec.arg.name!r} is not a tensor")
            model.inputs.append(value_spec)
            model.input_nodes.append(node.name)
            model.nodes[node.name] = NodeInfo(node.name, "input", value_spec)
            continue
        target = str(spec.target)
        if spec.kind == InputKind.PARAMETER:
            value = program.state_dict[target]
        elif spec.kind == InputKind.BUFFER:
            value = program.state_dict[target] if spec.persistent else program.constants[target]
        else:  # CONSTANT_TENSOR
            value = program.constants[target]
        tensor = value.detach().to(device)
        model.state.append((target, tensor, spec.kind == InputKind.PARAMETER))

    output_node = next(n for n in graph.nodes if n.op == "output")
    flat_outputs = output_node.args[0]
    for position, spec in enumerate(signature.output_specs):
        if spec.kind != OutputKind.USER_OUTPUT:
            continue
        value = flat_outputs[position]
        out_spec = _spec(
            value.meta.get("val") if isinstance(value, torch.fx.Node) else value, ranges
        )
        if out_spec is None:
            raise ModelLoadError(f"output {position} is not a tensor")
        model.outputs.append(out_spec)
        model.output_positions.append(position)
        model.output_nodes.append(value.name if isinstance(value, torch.fx.Node) else "")

    dependent = {
        name for name, spec in zip(model.input_nodes, model.inputs) if spec.dtype.is_floating_point
    }
    for node in graph.nodes:
        if node.op == "call_function" and any(a.name in dependent for a in node.all_input_nodes):
            dependent.add(node.name)
    model.input_dependent = frozenset(dependent)

    for node in graph.nodes:
        if node.op != "call_function":
            continue
        node_spec = _spec(node.meta.get("val"), ranges)
        if node_spec is not None:
            model.nodes[node.name] = NodeInfo(node.name, str(node.target), node_spec)
    model.modules = {
        path: (mtype, node)
        for path, (mtype, node) in _module_outputs(graph).items()
        if node in model.nodes
    }
    return model


class Registry:
    """The served models by name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._models: dict[str, Model] = {}

    def add(self, name: str, source: str, program: ExportedProgram) -> Model:
        if not MODEL_NAME.fullmatch(name):
            raise ModelLoadError(f"model name {name!r} does not match {MODEL_NAME.pattern}")
        if name in self._models:
            raise ModelLoadError(f"model {name!r} is defined twice")
        model = prepare(name, source, program, self.device)
        self._models[name] = model
        return model

    def get(self, name: str) -> Model | None:
        return self._models.get(name) if MODEL_NAME.fullmatch(name) else None

    def __iter__(self) -> Iterator[Model]:
        return iter(sorted(self._models.values(), key=lambda m: m.name))

    def __len__(self) -> int:
        return len(self._models)


def load_builtins(registry: Registry) -> None:
    """Exports and registers the seed zoo."""
    for name in BUILTINS:
        registry.add(name, "builtin", export_builtin(name))


def load_repository(registry: Registry, directory: Path) -> list[str]:
    """Loads every NAME.pt2 in `directory`; returns the names of archives it refused."""
    refused = []
    for path in sorted(directory.glob("*.pt2")):
        name = path.name[: -len(".pt2")]
        try:
            if not path.is_file():
                raise ModelLoadError("not a regular file")
            data = path.read_bytes()
            options = archive_options(data)
            model = registry.add(name, "repository", load_archive(data))
            model.batchable = bool(options.get("batching", True))
        except ModelLoadError as e:
            log.error("refusing model archive %s: %s", path.name, e)
            refused.append(name)
    return refused

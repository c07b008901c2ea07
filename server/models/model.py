"""What a model is: an exported program indexed for targeting, and the questions asked of it.

A request names nodes, inputs and parameters; the model answers which graph node a name
means (`resolve`), whether inputs fit its exported specs (`check_inputs`), and which of its
parameters a list of names picks (`param_positions`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import InvalidArgument, ModelLoadError


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
    """False when the model opted out of dynamic batching (see engine/batching.py)."""
    version: str = "1"
    """Which version of the model this is (see registry.py)."""
    key: int = field(default_factory=itertools.count(1).__next__)
    """Unique to this loaded object: what the engine's caches are keyed by, so that a new
    version (or the same one loaded again) never meets the graphs and weights of another."""

    def resolve(self, name: str) -> str | None:
        """The graph node a name means: a node name, else a module path's output."""
        if name in self.nodes:
            return name
        module = self.modules.get(name)
        return module[1] if module else None

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        """Checks count, dtype and shape of every input against the exported input specs.

        Only dtypes and shapes are read, so tensors without storage (on the meta device)
        can be checked before a byte of their data is copied.
        """
        if len(inputs) != len(self.inputs):
            raise InvalidArgument(
                f"{self.name} takes {len(self.inputs)} input(s), got {len(inputs)}",
                reason="WRONG_INPUT_COUNT",
                field="inputs",
            )
        bound: dict[str, tuple[int, int]] = {}
        for i, (tensor, spec) in enumerate(zip(inputs, self.inputs)):
            if tensor.dtype != spec.dtype:
                raise InvalidArgument(
                    f"inputs[{i}] has dtype {dtype_name(tensor.dtype)}, "
                    f"{self.name} expects {dtype_name(spec.dtype)}",
                    reason="WRONG_DTYPE",
                    field=f"inputs[{i}].dtype",
                )
            if tensor.dim() != len(spec.dims):
                raise InvalidArgument(
                    f"inputs[{i}] has shape {list(tensor.shape)}, {self.name} expects "
                    f"{_shape_text(spec.dims)}",
                    reason="WRONG_SHAPE",
                    field=f"inputs[{i}].shape",
                )
            for d, (size, dim) in enumerate(zip(tensor.shape, spec.dims)):
                ok = (
                    size == dim.size
                    if dim.size is not None
                    else (size >= dim.min and (dim.max is None or size <= dim.max))
                )
                if dim.size is None and ok:
                    first = bound.setdefault(dim.symbol, (size, i))
                    ok = first[0] == size
                if not ok:
                    raise InvalidArgument(
                        f"inputs[{i}] has shape {list(tensor.shape)}, {self.name} expects "
                        f"{_shape_text(spec.dims)} (dimension {d})",
                        reason="WRONG_SHAPE",
                        field=f"inputs[{i}].shape",
                    )

    def param_positions(self, names: Sequence[str]) -> list[int]:
        """Positions in `state` of the named parameters, in state order, each once;
        ALL_PARAMETERS ("*") names every parameter.

        Raises InvalidArgument naming `param_grads[i]` for an unknown name or a buffer.
        """
        positions = {name: i for i, (name, _, _) in enumerate(self.state)}
        wanted: set[int] = set()
        for i, name in enumerate(names):
            if name == ALL_PARAMETERS:
                wanted.update(p for p, (_, _, is_param) in enumerate(self.state) if is_param)
                continue
            position = positions.get(name)
            if position is None:
                shown = name if len(name) <= 80 else name[:80] + "..."
                raise InvalidArgument(
                    f"unknown parameter {shown!r}: not a state-dict name of {self.name} "
                    "(DescribeModel lists its parameters)",
                    reason="UNKNOWN_PARAMETER",
                    field=f"param_grads[{i}]",
                )
            if not self.state[position][2]:
                raise InvalidArgument(
                    f"{name!r} is a buffer of {self.name}, not a parameter: it has no gradient",
                    reason="NOT_A_PARAMETER",
                    field=f"param_grads[{i}]",
                )
            wanted.add(position)
        return sorted(wanted)


ALL_PARAMETERS = "*"
"""The parameter name that means every parameter."""


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as messages name it: "float32", not "torch.float32"."""
    return str(dtype).removeprefix("torch.")


def bindings(model: Model, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Symbol name -> size, from inputs that fit the model (`Model.check_inputs`); tensors on
    the meta device do, as only their shapes are read."""
    bound: dict[str, int] = {}
    for spec, tensor in zip(model.inputs, inputs):
        for dim, size in zip(spec.dims, tensor.shape):
            if dim.size is None and dim.expr is not None and dim.expr.is_Symbol:
                bound[dim.symbol] = int(size)
    return bound


def size_of(dim: Dim, bound: dict[str, int]) -> int | None:
    """A dimension's size once the input symbols are bound; None when it stays unknown (a
    size the graph computes from data)."""
    if dim.size is not None:
        return dim.size
    if dim.symbol in bound:
        return bound[dim.symbol]
    if (
        dim.expr is not None
        and dim.expr.free_symbols
        and all(str(s) in bound for s in dim.expr.free_symbols)
    ):  # a derived size such as 2*s77
        value = dim.expr.subs({s: bound[str(s)] for s in dim.expr.free_symbols})
        if value.is_number:
            return max(int(value), 0)
    return None


def shape_of(spec: Spec, bound: dict[str, int]) -> tuple[int | None, ...]:
    """A node's (or output's) shape for inputs whose symbols are `bound`; None where unknown."""
    return tuple(size_of(d, bound) for d in spec.dims)


def _shape_text(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d.size) if d.size is not None else d.symbol for d in dims) + "]"


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


def prepare(
    name: str, source: str, program: ExportedProgram, device: torch.device, version: str = "1"
) -> Model:
    """Indexes an exported program's graph and moves its weights to `device`."""
    graph = program.graph
    ranges = dict(program.range_constraints)
    signature = program.graph_signature
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    model = Model(
        name=name, source=source, program=program, digest=_digest(program), version=version
    )

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

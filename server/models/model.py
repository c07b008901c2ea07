"""What a model is: an exported program indexed for targeting (specs, nodes, modules, state)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import ModelLoadError


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

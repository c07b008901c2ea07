"""What a model is: an exported program indexed for targeting, and the questions asked of it.

A request names nodes, inputs, outputs and parameters; the model answers which graph node a
name means (`resolve`), which output a name or position means (`output_position`), whether
inputs fit its exported specs (`check_inputs`), and which of its parameters a list of names
picks (`param_positions`). `prepare` builds the served graph from the exported one
(server/models/rewrite.py) and names what the user sees (server/models/naming.py).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import InvalidArgument, ModelLoadError
from . import naming, rewrite
from .padding import Padding
from .structures import Renamed


@dataclass(frozen=True)
class Dim:
    """One dimension of an input or node: a fixed size, or a symbol with a range."""

    size: int | None
    symbol: str = ""
    min: int = 0
    max: int | None = None
    expr: Any = field(default=None, compare=False, repr=False)
    """The sympy expression of a dynamic dimension (e.g. s77, or 2*s77)."""
    name: str = ""
    """A dynamic dimension in the user's words: `batch`, `sequence`, `dim2`, `sequence - 1`."""

    def text(self) -> str:
        """`3` for a fixed size; `batch 1..64` for a dynamic one (its name and range)."""
        if self.size is not None:
            return str(self.size)
        return f"{self.name or self.symbol} {self.min}..{'' if self.max is None else self.max}"


@dataclass(frozen=True)
class Spec:
    """The dtype and shape of a tensor in the graph."""

    dtype: torch.dtype
    dims: tuple[Dim, ...]
    name: str = ""
    """For a model input or output: its name (`input_ids`, `logits`, `hidden_states.3`)."""
    high: int | None = None
    """For an integer input that indexes an embedding: the exclusive upper bound of its values."""


@dataclass(frozen=True)
class NodeInfo:
    """A targetable node of the exported graph."""

    name: str
    op: str
    spec: Spec
    note: str = ""
    """What a caller should know about the node's value (e.g. an in-place operation)."""

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
    """module path -> (module type, node producing its output); for a module called several
    times, the output of its last call."""
    module_calls: dict[str, list[str]] = field(default_factory=dict)
    """module path -> the node producing the output of each call, in call order; `PATH#K`
    names call K (from 1)."""
    fixed_inputs: dict[str, Any] = field(default_factory=dict)
    """Non-tensor inputs fixed at export (e.g. use_cache=False): folded into the graph."""
    renamed: list[Renamed] = field(default_factory=list)
    """The archive's own output classes, served as dicts of their fields."""
    state: list[tuple[str, torch.Tensor, bool]] = field(default_factory=list)
    """The non-user graph inputs in order: (state-dict name, value, is_parameter)."""
    output_nodes: list[str] = field(default_factory=list)
    """The node behind each user output."""
    input_dependent: frozenset[str] = frozenset()
    """Nodes whose value depends on a floating-point user input (so carry its gradient)."""
    batchable: bool = True
    """False when the model opted out of dynamic batching (see engine/batching.py)."""
    padding: Padding | None = None
    """How rows of different lengths may share a batch (server/models/padding.py)."""
    tokenizer: Any = None
    """The archive's tokenizer (a tokenizers.Tokenizer), if it carries one (models/text.py)."""
    version: str = "1"
    """Which version of the model this is (see registry.py)."""
    key: int = field(default_factory=itertools.count(1).__next__)
    """Unique to this loaded object: what the engine's caches are keyed by, so that a new
    version (or the same one loaded again) never meets the graphs and weights of another."""

    def resolve(self, name: str) -> str | None:
        """The graph node a name means: a node name, else a module path's output (of its
        last call), else `PATH#K`, the output of the module's call K (from 1)."""
        if name in self.nodes:
            return name
        module = self.modules.get(name)
        if module:
            return module[1]
        path, hash_, call = name.rpartition("#")
        calls = self.module_calls.get(path) if hash_ and call.isdigit() else None
        if calls and 1 <= int(call) <= len(calls):
            return calls[int(call) - 1]
        return None

    def output_position(self, name: str, field: str) -> int:
        """The position of the output a name means (`logits`, or `2` for position 2).

        Raises InvalidArgument naming `field` for a name that is no output."""
        for position, spec in enumerate(self.outputs):
            if spec.name == name:
                return position
        if name.isdigit() and int(name) < len(self.outputs):
            return int(name)
        shown = name if len(name) <= 80 else name[:80] + "..."
        known = ", ".join(spec.name for spec in self.outputs[:8])
        more = ", ..." if len(self.outputs) > 8 else ""
        raise InvalidArgument(
            f"unknown output {shown!r}: {self.name}'s outputs are {known}{more}",
            reason="UNKNOWN_OUTPUT",
            field=field,
        )

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
        bound: dict[str, tuple[int, int, int]] = {}
        for i, (tensor, spec) in enumerate(zip(inputs, self.inputs)):
            if tensor.dtype != spec.dtype:
                raise InvalidArgument(
                    f"inputs[{i}] has dtype {dtype_name(tensor.dtype)}, "
                    f"{self.name} expects {dtype_name(spec.dtype)}",
                    reason="WRONG_DTYPE",
                    field=f"inputs[{i}].dtype",
                )
            takes = f"{self.name} takes {_input_label(spec, i)}{shape_text(spec.dims)}"
            if tensor.dim() != len(spec.dims):
                raise InvalidArgument(
                    f"inputs[{i}] has shape {list(tensor.shape)}; {takes}: it has "
                    f"{tensor.dim()} dimension(s), not {len(spec.dims)}",
                    reason="WRONG_SHAPE",
                    field=f"inputs[{i}].shape",
                )
            for d, (size, dim) in enumerate(zip(tensor.shape, spec.dims)):
                why = ""
                if dim.size is not None:
                    why = f"is {size}, not {dim.size}" if size != dim.size else ""
                elif size < dim.min:
                    why = f"is below {dim.min}"
                elif dim.max is not None and size > dim.max:
                    why = f"is above {dim.max}"
                else:
                    first = bound.setdefault(dim.symbol, (size, i, d))
                    if first[0] != size:
                        why = (
                            f"is {size}, but {dim.name or dim.symbol} is {first[0]} in "
                            f"inputs[{first[1]}] (dimension {first[2]})"
                        )
                if why:
                    raise InvalidArgument(
                        f"inputs[{i}] has shape {list(tensor.shape)}; {takes}: dimension {d} {why}",
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


def shape_text(dims: Sequence[Dim]) -> str:
    """A shape in the user's words: `(batch 1..64, sequence 2..512)`, `(batch 1.., 1000)`."""
    return "(" + ", ".join(d.text() for d in dims) + ")"


def dims_text(dims: Sequence[Dim]) -> str:
    """A shape with its dynamic dimensions named and no ranges: `(batch, sequence, 50257)`."""
    return (
        "("
        + ", ".join(str(d.size) if d.size is not None else d.name or d.symbol for d in dims)
        + ")"
    )


def _input_label(spec: Spec, i: int) -> str:
    return f"{spec.name} " if spec.name and spec.name != str(i) else ""


def _dim(size: Any, ranges: dict[Any, Any], names: dict[Any, str]) -> Dim:
    if isinstance(size, int):
        return Dim(size=size)
    expr = size.node.expr
    vr = ranges.get(expr)
    lower = int(vr.lower) if vr is not None and vr.lower.is_finite else 0
    upper = int(vr.upper) if vr is not None and vr.upper.is_finite else None
    name = naming.expression_text(expr, names)
    return Dim(size=None, symbol=str(expr), min=lower, max=upper, expr=expr, name=name)


def _spec(value: Any, ranges: dict[Any, Any], names: dict[Any, str]) -> Spec | None:
    if not isinstance(value, torch.Tensor):
        return None
    return Spec(dtype=value.dtype, dims=tuple(_dim(s, ranges, names) for s in value.shape))


def _module_calls(graph: torch.fx.Graph) -> dict[str, tuple[str, list[str]]]:
    """Maps each module path to its type and the node whose value leaves each of its calls
    (its output), in call order. torch.export marks the calls after the first `@1`, `@2`...
    in the keys of a node's nn_module_stack."""
    members: dict[tuple[str, int], list[torch.fx.Node]] = {}
    types: dict[str, str] = {}
    for node in graph.nodes:
        for key, (path, mtype) in (node.meta.get("nn_module_stack") or {}).items():
            path = re.sub(r"@\d+$", "", str(path))
            if not path or path.startswith("_"):
                continue
            marked = re.search(r"@(\d+)$", str(key))
            call = int(marked.group(1)) if marked else 0
            members.setdefault((path, call), []).append(node)
            types[path] = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", "")
    calls: dict[str, dict[int, str]] = {}
    for (path, call), nodes in members.items():
        inside = set(nodes)
        leaving = [
            n
            for n in nodes
            if isinstance(n.meta.get("val"), torch.Tensor)
            and any(user not in inside for user in n.users)
        ]
        if leaving:
            calls.setdefault(path, {})[call] = leaving[-1].name
    return {
        path: (types[path], [by_call[c] for c in sorted(by_call)])
        for path, by_call in sorted(calls.items())
    }


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
    name: str,
    source: str,
    program: ExportedProgram,
    device: torch.device,
    version: str = "1",
    *,
    dims: dict[str, str] | None = None,
    renamed: Sequence[Renamed] = (),
) -> Model:
    """Builds the served graph from an exported program (constant inputs folded in, in-place
    operators made functional where exact), indexes it and moves its weights to `device`.

    `dims` names dynamic dimensions by symbol (an archive's gradtap.json); `renamed` are the
    archive's own output classes that the loader served as dicts."""
    model = Model(
        name=name, source=source, program=program, digest=_digest(program), version=version
    )
    model.renamed = list(renamed)
    model.fixed_inputs = rewrite.fold_fixed_inputs(program)
    notes = rewrite.functionalize_in_place(program)
    graph = program.graph
    ranges = dict(program.range_constraints)
    signature = program.graph_signature
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}

    user_placeholders = [
        spec.arg.name for spec in signature.input_specs if spec.kind == InputKind.USER_INPUT
    ]
    all_names = dict(zip(user_placeholders, naming.input_names(program, user_placeholders)))
    tensor_inputs = [
        (all_names[p], placeholders[p].meta.get("val"))
        for p in user_placeholders
        if p in placeholders and isinstance(placeholders[p].meta.get("val"), torch.Tensor)
    ]
    names = naming.dim_names(tensor_inputs, dims or {})
    bounds = naming.index_bounds(graph, list(placeholders))

    for spec in signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            if spec.arg.name in model.fixed_inputs:
                continue
            node = placeholders[spec.arg.name]
            value_spec = _spec(node.meta.get("val"), ranges, names)
            if value_spec is None:
                raise ModelLoadError(f"input {spec.arg.name!r} is not a tensor")
            value_spec = replace(value_spec, name=all_names[node.name], high=bounds.get(node.name))
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
    user_positions = [
        p for p, spec in enumerate(signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT
    ]
    out_names = naming.output_names(program, len(user_positions))
    for position, out_name in zip(user_positions, out_names):
        value = flat_outputs[position]
        out_spec = _spec(
            value.meta.get("val") if isinstance(value, torch.fx.Node) else value, ranges, names
        )
        if out_spec is None:
            raise ModelLoadError(f"output {position} ({out_name}) is not a tensor")
        model.outputs.append(replace(out_spec, name=out_name))
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
        node_spec = _spec(node.meta.get("val"), ranges, names)
        if node_spec is not None:
            note = notes.get(node.name, "")
            model.nodes[node.name] = NodeInfo(node.name, str(node.target), node_spec, note)
    for input_node in model.input_nodes:
        if input_node in notes:
            info = model.nodes[input_node]
            model.nodes[input_node] = replace(info, note=notes[input_node])
    for path, (mtype, calls) in _module_calls(graph).items():
        served = [node for node in calls if node in model.nodes]
        if len(served) == len(calls):
            model.modules[path] = (mtype, calls[-1])
            model.module_calls[path] = calls
    return model

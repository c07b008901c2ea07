"""The served graph, rewritten from the exported one: fixed inputs folded in, in-place
operators made functional where that is exact.

Both rewrites change the server's own copy of the program (loaded from the archive) and keep
every node's name, so that what describe lists is what a call names.

In-place operators. torch.export keeps `aten.relu_`, `aten.add_`... in its graphs: the node a
ReLU works on then holds, once the pass is over, the value after the ReLU, and its gradient
is the gradient after it too (eager `retain_grad()` has the same trap). gradtap returns the
value each node computed instead: an in-place operator becomes its functional variant, and
every later use of the value it changed reads the new node. That is exact only when no
other tensor shares the memory: never where the changed value is a view of another tensor
(`x[:, 0].add_(1)`) or has a view taken of it, nor where it is a graph input, and only where
the functional variant returns the same dtype. The operator schema's alias annotations tell
which arguments an operator writes and which results are views. Where the rewrite is not
exact, the graph is left as it was and the changed node gets a note that describe shows.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind


def fold_fixed_inputs(program: ExportedProgram) -> dict[str, Any]:
    """Replaces each constant user input (a non-tensor argument fixed at export, such as
    `use_cache=False`) by its value and drops its placeholder; returns them by name.

    Callers then send tensors only, in the order of the remaining inputs."""
    graph = program.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    fixed: dict[str, Any] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT or not isinstance(spec.arg, ConstantArgument):
            continue
        node = placeholders.get(spec.arg.name)
        fixed[spec.arg.name] = spec.arg.value
        if node is None:
            continue
        for user in list(node.users):
            user.args = _replaced(user.args, node, spec.arg.value)
            user.kwargs = _replaced(user.kwargs, node, spec.arg.value)
        graph.erase_node(node)
    if fixed:
        program.graph_module.recompile()
    return fixed


def _replaced(args: Any, node: torch.fx.Node, value: Any) -> Any:
    """`args` (a node's args or kwargs) with every use of `node` replaced by `value`."""
    if isinstance(args, tuple):
        return tuple(_replaced(a, node, value) for a in args)
    if isinstance(args, list):
        return [_replaced(a, node, value) for a in args]
    if isinstance(args, dict):
        return {k: _replaced(v, node, value) for k, v in args.items()}
    return value if args is node else args


def _schema(node: torch.fx.Node) -> Any:
    target = node.target
    return target._schema if isinstance(target, torch._ops.OpOverload) else None


def _written(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph values an operator node writes into (its mutable arguments)."""
    schema = _schema(node)
    if schema is None:
        return []
    written = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
        if isinstance(value, torch.fx.Node):
            written.append(value)
    return written


def _is_view(node: torch.fx.Node) -> bool:
    """True when the node's value shares memory with one of its inputs (a view)."""
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, torch.fx.Node) and _is_view(source)
    schema = _schema(node)
    if schema is None:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _functional(node: torch.fx.Node) -> Any:
    """The functional variant of an in-place operator that writes its first argument and
    returns it (relu_ -> relu, add_.Tensor -> add.Tensor); None for anything else."""
    schema = _schema(node)
    if schema is None or not schema.arguments or len(schema.returns) != 1:
        return None
    first, returned = schema.arguments[0], schema.returns[0]
    if first.alias_info is None or not first.alias_info.is_write:
        return None
    if returned.alias_info is None or not returned.alias_info.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[1:]):
        return None
    namespace, _, name = schema.name.partition("::")
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(getattr(torch.ops, namespace), name[:-1], None)
    overload = getattr(packet, node.target._overloadname, None) if packet else None  # type: ignore[union-attr]
    if not isinstance(overload, torch._ops.OpOverload):
        return None
    arguments = overload._schema.arguments
    # The written argument is `self` in place and often `input` in the functional variant.
    if len(arguments) != len(schema.arguments):
        return None
    if [a.name for a in arguments[1:]] != [a.name for a in schema.arguments[1:]]:
        return None
    return overload


def _dtype(node: Any) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _same_dtype(node: torch.fx.Node, written: torch.fx.Node) -> bool:
    """True when the functional variant of `node` returns what it writes: the dtype of the
    written value. Checked conservatively: every tensor argument has that dtype, and no
    Python float meets an integer tensor."""
    dtype = _dtype(written)
    if dtype is None:
        return False
    for value in [*node.args[1:], *node.kwargs.values()]:
        if isinstance(value, torch.fx.Node):
            if _dtype(value) not in (None, dtype):
                return False
        elif isinstance(value, float) and not (dtype.is_floating_point or dtype.is_complex):
            return False
        elif isinstance(value, complex) and not dtype.is_complex:
            return False
    return True


def functionalize_in_place(program: ExportedProgram) -> dict[str, str]:
    """Makes every in-place operator of the program's graph functional where that is exact
    (see the module docstring); returns a note per node whose value stays changed in place."""
    graph = program.graph
    nodes = list(graph.nodes)
    # Every value's alias group: the value an in-place op returns is its argument.
    group: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        written = _written(node)
        if len(written) == 1 and _functional(node) is not None:
            group[node] = group.get(written[0], written[0])
    viewed = {
        group.get(arg, arg)
        for node in nodes
        if node.op == "call_function" and _is_view(node)
        for arg in node.all_input_nodes
    }

    notes: dict[str, str] = {}
    latest: dict[torch.fx.Node, torch.fx.Node] = {}
    changed = False
    for node in nodes:
        if node.op == "output" or node.op == "call_function":
            node.args = torch.fx.node.map_arg(node.args, lambda n: latest.get(group.get(n, n), n))
            node.kwargs = torch.fx.node.map_arg(
                node.kwargs, lambda n: latest.get(group.get(n, n), n)
            )
        if node.op != "call_function":
            continue
        written = _written(node)
        if not written:
            continue
        functional = _functional(node)
        root = group.get(written[0], written[0]) if len(written) == 1 else None
        why = None
        if functional is None or root is None:
            why = "the operator has no exact functional variant"
        elif root.op != "call_function":
            why = "it is a model input, weight or buffer"
        elif _is_view(root):
            why = "it is a view of another tensor"
        elif root in viewed:
            why = "views of it are taken"
        elif not _same_dtype(node, written[0]):
            why = "the functional operator would change its dtype"
        if why is not None:
            for value in written:
                for changed_node in dict.fromkeys([value, group.get(value, value)]):
                    notes.setdefault(
                        changed_node.name,
                        f"changed in place by {node.name} ({node.target}), which gradtap "
                        f"cannot undo because {why}: its activation and gradient are those "
                        f"after {node.name}",
                    )
            continue
        assert root is not None
        name, inplace = node.name, node.target
        node.target = functional  # same node, same name: it now returns a value of its own
        group[node] = root
        latest[root] = node
        notes[name] = (
            f"{inplace} in the export, served as {functional}: {root.name} keeps the value "
            "it computed"
        )
        changed = True
    if changed:
        graph.lint()
        program.graph_module.recompile()
    return notes

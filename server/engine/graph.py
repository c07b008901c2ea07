"""Variants of a model's flat graph that also return the nodes a request captures, and the
stop checks between their operators.

A variant is the exported program's graph, copied and rewritten so that every captured node
is also a graph output: `torch.autograd.grad` on those outputs gives exactly what
`retain_grad()` would, without hooks and without parameter gradients nobody asked for.
"""

from __future__ import annotations

import functools
import linecache
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..errors import Cancelled
from ..models.model import Model

VARIANTS_PER_MODEL = 32
"""Compiled graph variants kept per model (one per distinct set of captured nodes)."""

ShouldStop = Callable[[], bool]
"""True once the caller went away or the call ran out of time."""


def never() -> bool:
    """The should_stop of a call nobody can cancel."""
    return False


_checkpoints = threading.local()
"""The running request's should_stop, per thread, read by _checkpoint inside the graph."""


def _checkpoint() -> None:
    should_stop = getattr(_checkpoints, "should_stop", None)
    if should_stop is not None and should_stop():
        raise Cancelled("the call was cancelled", reason="CANCELLED")


def add_checkpoints(graph: torch.fx.Graph) -> None:
    """Puts a check after every operator of `graph` that stops it once the should_stop its
    thread `watch`es says so: a cancelled or expired call stops within one layer."""
    for node in list(graph.nodes):
        if node.op == "call_function":
            with graph.inserting_after(node):
                graph.call_function(_checkpoint)


def watch(should_stop: ShouldStop | None) -> None:
    """Sets the should_stop that variants run by this thread check between operators;
    None clears it."""
    _checkpoints.should_stop = should_stop


class Variants:
    """The variants of each model, compiled on first use; safe to use from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modules: dict[int, dict[tuple[str, ...], torch.fx.GraphModule]] = {}
        """Model.key -> captured nodes -> compiled variant."""

    def get(self, model: Model, captures: tuple[str, ...]) -> Callable[..., Any]:
        """The model's flat graph returning (user outputs..., captured nodes...).

        The first sets of captured nodes each get a compiled graph, kept for good. Compiling
        costs native memory torch.fx never gives back, so past that number a new set runs
        through torch.fx's Interpreter instead: a little slower, with the same operators
        and numbers, and nothing left behind.
        """
        with self._lock:
            cache = self._modules.setdefault(model.key, {})
            module = cache.get(captures)
            if module is not None:
                return module
            if len(cache) >= VARIANTS_PER_MODEL:
                return functools.partial(_interpreted, model, captures)
        module = _compiled(model, captures)
        with self._lock:
            if len(cache) < VARIANTS_PER_MODEL:
                cache.setdefault(captures, module)
                return cache[captures]
        release(module)
        return functools.partial(_interpreted, model, captures)

    def forget(self, model: Model) -> None:
        """Drops and releases the variants of `model`."""
        with self._lock:
            modules = self._modules.pop(model.key, {})
        for module in modules.values():
            release(module)


def _compiled(model: Model, captures: tuple[str, ...]) -> torch.fx.GraphModule:
    source = model.program.graph
    graph = torch.fx.Graph()
    copied: dict[torch.fx.Node, torch.fx.Node] = {}
    flat_outputs = graph.graph_copy(source, copied)
    assert isinstance(flat_outputs, (tuple, list))
    by_name = {old.name: new for old, new in copied.items()}
    add_checkpoints(graph)
    user_outputs = [flat_outputs[p] for p in model.output_positions]
    graph.output((*user_outputs, *(by_name[name] for name in captures)))
    return torch.fx.GraphModule(model.program.graph_module, graph)


def substituted(model: Model, node: str, captures: tuple[str, ...] = ()) -> torch.fx.GraphModule:
    """The model's flat graph with `node`'s value taken from an extra last input instead of
    computed: forward(*state, *inputs, value) -> (user outputs..., captured nodes...).

    This is how a layer method patches a layer's output (Captum's forward hooks do the same
    on modules): the value fed in may be interpolated, and its gradient is the node's.
    """
    source = model.program.graph
    graph = torch.fx.Graph()
    copied: dict[torch.fx.Node, torch.fx.Node] = {}
    flat_outputs = graph.graph_copy(source, copied)
    assert isinstance(flat_outputs, (tuple, list))
    by_name = {old.name: new for old, new in copied.items()}
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        value = graph.placeholder("gradtap_substitute")
    by_name[node].replace_all_uses_with(value)
    add_checkpoints(graph)
    replaced = by_name[node]
    user_outputs = [
        value if flat_outputs[p] is replaced else flat_outputs[p] for p in model.output_positions
    ]
    captured = [value if name == node else by_name[name] for name in captures]
    graph.output((*user_outputs, *captured))
    return torch.fx.GraphModule(model.program.graph_module, graph)


class _Capturing(torch.fx.Interpreter):
    """Runs a graph node by node, keeping the values of the wanted nodes."""

    def __init__(self, module: torch.fx.GraphModule, wanted: tuple[str, ...]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.wanted = set(wanted)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = value
        if n.op == "call_function":
            _checkpoint()
        return value


def _interpreted(model: Model, captures: tuple[str, ...], *args: torch.Tensor) -> tuple[Any, ...]:
    """What a compiled variant returns, computed by the Interpreter."""
    interpreter = _Capturing(model.program.graph_module, captures)
    flat = interpreter.run(*args)
    outputs = [flat[p] for p in model.output_positions]
    return (*outputs, *(interpreter.values[name] for name in captures))


def release(module: torch.fx.GraphModule) -> None:
    """Drops the generated source torch.fx keeps, forever, for every GraphModule it compiles
    (in its loader's eval_cache and in linecache). Call it when a module is discarded;
    without it, each rebuilt graph variant leaks its source."""
    loader = getattr(torch.fx.graph_module, "_loader", None)
    for m in module.modules():
        if not isinstance(m, torch.fx.GraphModule):
            continue
        key = type(m).forward.__code__.co_filename
        if loader is not None:
            loader.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)

"""Captum over an exported graph: the model rewritten into a module Captum can hook, and each
method called with Captum's own names and defaults.

Captum hooks nn.Modules, and an exported program has none: its flat graph calls aten
operators. Each call therefore copies the graph and rewrites the copy so that Captum finds
what it hooks. A layer gets an nn.Identity right after its node, so a graph node and a
module path are layers alike; for guided backprop every aten.relu becomes an nn.ReLU
module. The copy is built per call (well under a millisecond for the seed models), so the
hooks Captum registers never touch a module that another call is running.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerConductance,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    Saliency,
)
from captum.attr._utils import approximation_methods
from torch import nn

from ..errors import Cancelled
from ..models.model import Model
from .graph import ShouldStop, add_checkpoints, never, watch

INTEGRATION_METHODS = (
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
)
"""Captum's names for the integration rules; the first is its default."""

LAYER_MODULE = "gradtap_layer"
"""The nn.Identity inserted after the layer's node; Captum hooks it."""


def _legendre(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """P_n(x) and P_n'(x), by the three-term recurrence."""
    before, value = np.ones_like(x), x.copy()
    for j in range(2, n + 1):
        before, value = value, ((2 * j - 1) * x * value - (j - 1) * before) / j
    return value, n * (x * value - before) / (x * x - 1)


@functools.lru_cache(maxsize=8)
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes (ascending) and weights on [-1, 1], as numpy's leggauss, by
    Newton's method from Tricomi's guesses: O(n^2). numpy's leggauss finds the eigenvalues
    of an n x n matrix: 60 s for n_steps=4096, twice per integrated_gradients call, in one
    numpy call that no should_stop can interrupt; this takes half a second."""
    if n == 1:
        return np.zeros(1), np.full(1, 2.0)
    k = np.arange(n, 0, -1)
    x = np.cos(np.pi * (k - 0.25) / (n + 0.5))
    for _ in range(100):
        value, slope = _legendre(x, n)
        step = value / slope
        x = x - step
        if np.max(np.abs(step)) < 1e-15:
            break
    _, slope = _legendre(x, n)
    return x, 2 / ((1 - x * x) * slope * slope)


def _gauss_legendre_builders() -> tuple[Callable[[int], list[float]], Callable[[int], list[float]]]:
    """Captum's gauss_legendre_builders, on `gauss_legendre`: step sizes and alphas."""

    def step_sizes(n: int) -> list[float]:
        return (0.5 * gauss_legendre(n)[1]).tolist()  # type: ignore[no-any-return]

    def alphas(n: int) -> list[float]:
        return (0.5 * (1 + gauss_legendre(n)[0])).tolist()  # type: ignore[no-any-return]

    return step_sizes, alphas


# Captum's integrated gradients (and ours in engine/tokens.py) find them through this name.
approximation_methods.gauss_legendre_builders = _gauss_legendre_builders


class ModelForward(nn.Module):
    """The model's flat graph as a module: forward(*captum_inputs, *held) -> one output.

    `slots[j]` is the forward argument that feeds model input j, so the attributed input
    can come first (Captum's `inputs`) and the rest follow (its additional_forward_args).
    Every call checks `should_stop`, before it and between the graph's operators, so a
    cancelled or expired call stops within one layer even inside one of Captum's batches.
    """

    def __init__(
        self,
        graph: torch.fx.GraphModule,
        state: Sequence[torch.Tensor],
        slots: Sequence[int],
        should_stop: ShouldStop = never,
    ) -> None:
        super().__init__()
        self.graph = graph
        self._state = tuple(state)
        self._slots = tuple(slots)
        self._should_stop = should_stop

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self._should_stop():
            raise Cancelled("the call was cancelled", reason="CANCELLED")
        watch(self._should_stop)
        try:
            result = self.graph(*self._state, *(args[k] for k in self._slots))
        finally:
            watch(None)
        assert isinstance(result, torch.Tensor)
        return result

    @property
    def layer(self) -> nn.Module:
        """The identity module standing for the layer."""
        return self.graph.get_submodule(LAYER_MODULE)


def rewritten_graph(
    model: Model, output: int, layer: str | None = None, guided: bool = False
) -> torch.fx.GraphModule:
    """A copy of the model's flat graph returning one output, with an identity module after
    `layer` and, when `guided`, every aten.relu replaced by an nn.ReLU module."""
    source = model.program.graph
    graph = torch.fx.Graph()
    copied: dict[torch.fx.Node, torch.fx.Node] = {}
    flat = graph.graph_copy(source, copied)
    assert isinstance(flat, (tuple, list))
    result = flat[model.output_positions[output]]
    root: dict[str, Any] = {
        str(old.target): functools.reduce(
            getattr, str(old.target).split("."), model.program.graph_module
        )
        for old in source.nodes
        if old.op == "get_attr"
    }
    if layer is not None:
        node = next(new for old, new in copied.items() if old.name == layer)
        anchor = node
        if node.op == "placeholder":  # a model input: tap it after the last placeholder
            anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(anchor):
            tap = graph.call_module(LAYER_MODULE, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
        root[LAYER_MODULE] = nn.Identity()
        result = tap if result is node else result
    if guided:
        relus = [
            n
            for n in graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.relu.default
        ]
        for i, node in enumerate(relus):
            name = f"gradtap_relu_{i}"
            with graph.inserting_after(node):
                module_call = graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(module_call)
            graph.erase_node(node)
            root[name] = nn.ReLU()
            result = module_call if result is node else result
    graph.output(result)
    add_checkpoints(graph)
    return torch.fx.GraphModule(root, graph)


def call(
    method: str,
    forward: ModelForward,
    inputs: tuple[torch.Tensor, ...],
    held: tuple[torch.Tensor, ...],
    target: int | list[int] | None,
    params: dict[str, Any],
) -> torch.Tensor:
    """Calls Captum's method with Captum's own parameter names and defaults: `inputs` are
    Captum's inputs, `held` its additional_forward_args."""
    extra = held or None
    x = inputs[0]
    integration = {
        "n_steps": params.get("n_steps", 50),
        "method": params.get("method", INTEGRATION_METHODS[0]),
        "internal_batch_size": params.get("internal_batch_size"),
    }
    baselines = params.get("baselines")
    if isinstance(baselines, torch.Tensor):
        baselines = baselines.to(x.device)
    result: Any
    if method == "saliency":
        result = Saliency(forward).attribute(
            x, target=target, abs=params.get("abs", True), additional_forward_args=extra
        )
    elif method == "input_x_gradient":
        result = InputXGradient(forward).attribute(x, target=target, additional_forward_args=extra)
    elif method == "integrated_gradients":
        ig = IntegratedGradients(forward, multiply_by_inputs=params.get("multiply_by_inputs", True))
        result = ig.attribute(
            x, baselines=baselines, target=target, additional_forward_args=extra, **integration
        )
    elif method == "smoothgrad":
        result = _smoothgrad(forward, x, target, held, params)
    elif method == "guided_backprop":
        result = GuidedBackprop(forward).attribute(x, target=target, additional_forward_args=extra)
    elif method == "layer_gradient_x_activation":
        lgxa = LayerGradientXActivation(
            forward, forward.layer, multiply_by_inputs=params.get("multiply_by_inputs", True)
        )
        result = lgxa.attribute(inputs, target=target, additional_forward_args=extra)
    elif method == "layer_grad_cam":
        result = LayerGradCam(forward, forward.layer).attribute(
            inputs,
            target=target,
            additional_forward_args=extra,
            relu_attributions=params.get("relu_attributions", False),
            attr_dim_summation=params.get("attr_dim_summation", True),
        )
    elif method == "layer_integrated_gradients":
        lig = LayerIntegratedGradients(
            forward, forward.layer, multiply_by_inputs=params.get("multiply_by_inputs", True)
        )
        result = lig.attribute(
            x, baselines=baselines, target=target, additional_forward_args=extra, **integration
        )
    elif method == "layer_conductance":
        result = LayerConductance(forward, forward.layer).attribute(
            x, baselines=baselines, target=target, additional_forward_args=extra, **integration
        )
    else:  # attribution.METHODS and this chain list the same names
        raise AssertionError(method)
    assert isinstance(result, torch.Tensor)
    return result


def _smoothgrad(
    forward: ModelForward,
    x: torch.Tensor,
    target: int | list[int] | None,
    held: tuple[torch.Tensor, ...],
    params: Mapping[str, Any],
) -> torch.Tensor:
    """Captum's NoiseTunnel(Saliency) with nt_type "smoothgrad", noise from a seeded generator.

    NoiseTunnel draws its noise from torch's global generator, which every thread of the
    server shares: seeding it would be neither thread-safe nor reproducible. This loop does
    what NoiseTunnel does, in the same order (batches of nt_samples_batch_size, then the
    remainder), drawing from a private CPU generator. On the CPU the noise is exactly what
    torch.manual_seed(seed) followed by NoiseTunnel would draw, and on any device a seed
    gives the same noise.
    """
    samples = int(params.get("nt_samples", 5))
    batch = min(samples, int(params.get("nt_samples_batch_size") or samples))
    stdev = float(params.get("stdevs", 1.0))
    generator = torch.Generator().manual_seed(int(params["seed"]))
    saliency = Saliency(forward)
    rows = x.shape[0]
    total: torch.Tensor | None = None
    done = 0
    while done < samples:
        k = min(batch, samples - done)
        shape = (rows * k, *x.shape[1:])
        with torch.no_grad():
            noise = torch.normal(0.0, torch.full(shape, stdev), generator=generator)
            noisy = (x.repeat_interleave(k, dim=0) + noise.to(x.device)).requires_grad_(True)
        expanded = [t for t in target for _ in range(k)] if isinstance(target, list) else target
        extra = tuple(t.repeat_interleave(k, dim=0) if t.dim() else t for t in held)
        attribution = saliency.attribute(
            noisy,
            target=expanded,
            abs=params.get("abs", True),
            additional_forward_args=extra or None,
        )
        part = attribution.detach().view(rows, k, *attribution.shape[1:]).sum(dim=1)
        total = part if total is None else total + part
        done += k
    assert total is not None
    return total * 1 / samples

"""What the calls return: results as numpy arrays with their metadata, and model descriptions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _plot
from ._legacy import ArrayResult
from ._target import Reduction


@dataclass
class Result:
    """What one analysis returned, as numpy arrays keyed as they were asked for.

    Attributes:
        gradients: target name -> gradient of the objective at that target.
        activations: target name -> the target's forward value.
        input_grads: input position -> gradient with respect to that input.
        outputs: the model's outputs, in order (when requested).
        loss: the objective's value (NaN without an objective).
        metadata: model, model_version, model_digest, device, torch_version, replica,
            batch_size, precision, timings (decode_ms, forward_ms, backward_ms, collect_ms,
            total_ms), bytes_received (tensor bytes that crossed the wire) and transport
            ("stream", or "shared_memory" when the server wrote the tensors into a
            SharedRegion); "item" (its position) for a result of analyze_many. model_version
            names the version that computed the result.
        param_grads: parameter state-dict name -> gradient of the objective.
        topk_indices: target name -> flat positions of the entries a topk target kept.
        reductions: target name -> what the server reduced, for targets with a reduction.
        patching: target name -> attribution patching's (activation at corrupt - activation)
            x gradient, after its reduction (attribution_patching).
        tokens: for a call sending text, each row's token strings as the server's tokenizer
            made them, padding included ("" at padding); empty otherwise.
        token_ids: for a call sending text, the (rows, length) token ids the server made.
        attention_mask: for a call sending text, the (rows, length) mask: 1 for the text's
            tokens, 0 for padding.
    """

    gradients: dict[str, np.ndarray] = field(default_factory=dict)
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    input_grads: dict[int, np.ndarray] = field(default_factory=dict)
    outputs: list[np.ndarray] = field(default_factory=list)
    loss: float = float("nan")
    metadata: dict[str, Any] = field(default_factory=dict)
    param_grads: dict[str, np.ndarray] = field(default_factory=dict)
    topk_indices: dict[str, np.ndarray] = field(default_factory=dict)
    reductions: dict[str, Reduction] = field(default_factory=dict)
    patching: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: list[list[str]] = field(default_factory=list)
    token_ids: np.ndarray | None = None
    attention_mask: np.ndarray | None = None

    def plot(
        self,
        path: str | os.PathLike[str],
        name: str | int | None = None,
        *,
        image: Any = None,
        row: int = 0,
        kind: str | None = None,
        size: tuple[int, int] | None = None,
        title: str | None = None,
    ) -> Path:
        """Writes a PNG of one returned tensor; needs matplotlib (the `plot` extra).

        Args:
            path: where to write the PNG.
            name: a target name (its gradient), an input position (its input gradient),
                or None for input gradient 0 if returned, else the first target gradient.
            image: the input the tensor belongs to (the same batch), drawn under an
                input gradient's heatmap.
            row: the batch row to draw.
            kind: "overlay", "bars" or "channels"; by default chosen from the shape, as
                gradtap.client.plot_attribution chooses it (docs/plots.md).
            size: (width, height) of the PNG in pixels.
            title: a title drawn on the picture.

        Returns:
            The path written.
        """
        if name is None:
            if 0 in self.input_grads:
                name = 0
            elif self.gradients:
                name = next(iter(self.gradients))
            else:
                raise ValueError(
                    "the result holds no input gradient and no target gradient to plot"
                )
        if isinstance(name, int):
            if name not in self.input_grads:
                raise ValueError(
                    f"the result holds no gradient of input {name} (ask for input_grads)"
                )
            array, reduction = self.input_grads[name], None
        elif name in self.gradients:
            array, reduction = self.gradients[name], self.reductions.get(name)
        else:
            known = ", ".join(self.gradients) or "none"
            raise ValueError(f"the result holds no gradient at {name!r} (targets: {known})")
        return _plot.plot_row(
            path,
            array,
            batched=not (reduction is not None and 0 in reduction.dims),
            node=isinstance(name, str),
            image=image,
            row=row,
            kind=kind,
            size=size,
            title=title,
        )


@dataclass(eq=False)
class AttributionResult(ArrayResult):
    """What an attribution returned.

    Attributes:
        attribution: the attribution, shaped like the input (input methods) or like the
            node (layer methods), batch first.
        metadata: model, model_version, method, node (None for input methods),
            model_digest, device, torch_version, captum_version, replica, seed (smoothgrad's
            noise seed; 0 for other methods), internal_batch_size (rows per pass of
            integration steps; 0 for other methods) and timings (compute_ms, total_ms).
    """

    attribution: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def plot(
        self,
        path: str | os.PathLike[str],
        *,
        image: Any = None,
        row: int = 0,
        kind: str | None = None,
        size: tuple[int, int] | None = None,
        title: str | None = None,
    ) -> Path:
        """Writes a PNG of one batch row of the attribution, as Result.plot draws a gradient:
        an input attribution over `image` (the input), a node's as its channels.

        Returns:
            The path written.
        """
        return _plot.plot_row(
            path,
            self.attribution,
            batched=True,
            node=self.metadata.get("node") is not None,
            image=image,
            row=row,
            kind=kind,
            size=size,
            title=title,
        )


@dataclass
class TokenAttributionResult:
    """What a token attribution returned.

    Attributes:
        scores: (continuation tokens, prompt tokens): row k attributes the log-probability
            of continuation token k to each prompt token; (1, prompt tokens) for an objective.
        values: each continuation token's log-probability given the tokens before it, or
            the objective's value.
        prompt: the prompt's token ids, as sent (or as the server tokenized prompt text).
        continuation: the continuation's token ids, as sent or tokenized (None for an
            objective).
        prompt_tokens: the prompt's token strings, for a prompt sent as text; else empty.
        continuation_tokens: the continuation's token strings, for a continuation sent as
            text; else empty.
        metadata: model, method, aggregate, node (the graph node attributed to),
            model_digest, device, torch_version, captum_version, replica, passes (forward
            and backward passes run), internal_batch_size (rows per pass) and timings
            (compute_ms, total_ms).
    """

    scores: np.ndarray
    values: list[float]
    prompt: np.ndarray
    continuation: np.ndarray | None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: list[str] = field(default_factory=list)
    continuation_tokens: list[str] = field(default_factory=list)

    def plot(
        self,
        path: str | os.PathLike[str],
        *,
        size: tuple[int, int] | None = None,
        title: str | None = None,
    ) -> Path:
        """Writes a PNG heat strip of the scores: one row per continuation token, one column
        per prompt token, labelled with the token strings (or ids for tokens sent as ids);
        needs matplotlib (the `plot` extra).

        Args:
            path: where to write the PNG.
            size: (width, height) of the PNG in pixels; by default it grows with the tokens.
            title: a title drawn on the picture.

        Returns:
            The path written.
        """
        prompt = self.prompt_tokens or [str(int(t)) for t in self.prompt]
        if self.continuation is None:
            continuation = [self.metadata.get("objective", "objective")]
        else:
            continuation = self.continuation_tokens or [str(int(t)) for t in self.continuation]
        return _plot.plot_tokens(
            path, self.scores, prompt, [str(c) for c in continuation], size=size, title=title
        )


@dataclass
class PerturbResult:
    """What an adversarial loop returned.

    Attributes:
        adversarial: the perturbed input, shaped like the input.
        losses: the objective at the start of each step, in order.
        objective_before: the objective at the unperturbed input.
        objective_after: the objective at the perturbed input.
        metadata: model, model_version, method, model_digest, device, torch_version,
            replica, seed (of the random start; 0 without one) and timings (total_ms).
    """

    adversarial: np.ndarray
    losses: list[float]
    objective_before: float
    objective_after: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Aggregate:
    """Running means over every item of an analyze_many job, computed on the server.

    Attributes:
        mean_gradients: target name -> the gradient averaged over every batch row of every
            item; shaped like one row (the target's shape without dimension 0).
        mean_abs_gradients: target name -> the mean of |gradient| per channel (dimension 1),
            over every other dimension of every item: shape (C,) for an (N, C, ...) target.
        items: how many items it averages over.
        rows: how many batch rows (dimension 0 of the inputs) it averages over.
        loss: the mean of the items' losses (NaN without an objective).
        metadata: model, model_version, model_digest, device, ... as Result.metadata has
            them.
    """

    mean_gradients: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs_gradients: dict[str, np.ndarray] = field(default_factory=dict)
    items: int = 0
    rows: int = 0
    loss: float = float("nan")
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model.

    Attributes:
        version: e.g. "1" or "2024-06-01"; built-in models are version "1".
        digest: "sha256:..." of its graph and weights; empty until it has loaded.
        state: "LOADING", "READY", "FAILED" or "UNLOADING".
        reason: why it FAILED; for a READY version, why its last reload failed.
        source: "builtin", "repository" or "upload".
    """

    version: str
    digest: str
    state: str
    reason: str = ""
    source: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """A served model: its name, content digest and where it came from (both those of its
    default version), its versions, its default version and its state.

    Attributes:
        default_version: the version a call naming none gets: the newest READY one, unless
            an operator pinned another.
        versions: every version, in natural order ("10" after "9").
        state: "READY" when its default version is; else "LOADING", "FAILED" (every
            version failed: `reason` says why) or "UNLOADING".
    """

    name: str
    digest: str
    source: str
    default_version: str = ""
    versions: tuple[ModelVersion, ...] = ()
    state: str = ""
    reason: str = ""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype and shape; None marks a dynamic dimension."""

    dtype: str
    shape: tuple[int | None, ...]
    min_shape: tuple[int, ...] = ()
    max_shape: tuple[int | None, ...] = ()
    name: str = ""
    """A model input's or output's name: "input_ids", "logits", "hidden_states.3"."""
    dims: tuple[str, ...] = ()
    """Per dimension, the dynamic dimension's name ("batch", "sequence"); "" when static."""
    high: int | None = None
    """For token ids: the exclusive upper bound of their values (the vocabulary size)."""


@dataclass(frozen=True)
class Node:
    """A node of the model's exported graph, which a call may target."""

    name: str
    op: str
    dtype: str
    shape: tuple[int | None, ...]
    differentiable: bool
    note: str = ""
    """What to know about the node's value, e.g. how gradtap serves an in-place operation."""
    dims: tuple[str, ...] = ()
    """Per dimension, the dynamic dimension's name ("batch", "sequence"); "" when static."""


@dataclass(frozen=True)
class ModelDescription:
    """What DescribeModel says: inputs, outputs, nodes, modules and parameters."""

    name: str
    digest: str
    source: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    nodes: list[Node]
    modules: dict[str, str]
    """module path -> the node producing its output (of its last call)."""
    parameters: list[str]
    version: str = ""
    """The version described: the one asked for, or the default."""
    default_version: str = ""
    versions: tuple[ModelVersion, ...] = ()
    calls: dict[str, list[str]] = field(default_factory=dict)
    """For modules called several times: module path -> the node of each call; "PATH#K"
    names call K (from 1)."""
    has_tokenizer: bool = False
    """The archive carries its tokenizer: calls may send text instead of token ids."""

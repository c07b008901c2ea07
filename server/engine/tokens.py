"""Token attribution: each continuation token's log-probability, or an objective, attributed to
each prompt token at a node (the token embedding by default), as Captum's
LLMGradientAttribution computes it with LayerGradientXActivation or LayerIntegratedGradients.
Captum runs one attribution per continuation token, each on the prompt and the continuation
tokens before it. On a causal model the logits at a position depend only on the tokens up to
it, so one sequence (prompt + continuation, less its last token) serves every continuation
token: row k of a pass scores token k from position P - 1 + k, and every integration step of
every token is a row of the same batched forward and backward passes. Whether a model is
causal is measured once (two forward passes); on any other model each token gets its own
sequence, as in Captum. The node's value is fed in through graph.substituted, so a row can
carry an interpolated embedding, as Captum's layer hooks do.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from captum.attr._utils.approximation_methods import approximation_parameters

from ..errors import Cancelled, ResourceExhausted
from ..models.model import Model, dtype_name, shape_of
from ..models.tokens import (
    bound,
    check_continuation,
    check_length,
    check_token_ids,
    fill,
    token_embedding,
    token_input,
)
from . import graph
from .analysis import Analysis, Engine, Role, Target
from .attribution import ACTIVATION_BUDGET_BYTES
from .graph import ShouldStop, never
from .memory import OVERHEAD_BYTES, Estimate
from .objectives import Objective, check, loss
from .token_requests import AGGREGATES as AGGREGATES
from .token_requests import METHODS as METHODS
from .token_requests import TokenAttribution as TokenAttribution
from .token_requests import TokensAttributed as TokensAttributed
from .token_requests import check_request, error


@dataclass(frozen=True)
class _Group:
    """Rows that share one sequence: its length and what each of its rows scores."""

    length: int
    scored: tuple[tuple[int, int], ...]
    """(continuation token id, position of the logits scoring it); empty for an objective."""


class TokenAttributor:
    """Runs token attributions through an engine; safe to use from many threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._causal: dict[tuple[str, str], bool] = {}
        self._graphs: dict[tuple[str, str, str, tuple[str, ...]], torch.fx.GraphModule] = {}
        self._rows: dict[tuple[str, str, int], int] = {}

    def attribute(
        self,
        model: Model,
        request: TokenAttribution,
        should_stop: ShouldStop = never,
        share: int | None = None,
    ) -> TokensAttributed:
        """Runs one token attribution; raises RequestError subclasses on bad requests. With a
        `share` (bytes: the call's share of the server's memory budget), a pass takes at most
        that, and a caller's internal_batch_size is lowered to fit it (scores are the same)."""
        try:
            return self._attribute(model, request, should_stop, share)
        except torch.OutOfMemoryError:
            if self.engine.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ResourceExhausted(
                "the device ran out of memory for this attribution; send a shorter sequence "
                "or a smaller internal_batch_size",
                reason="DEVICE_OUT_OF_MEMORY",
            ) from None

    # -- checks -----------------------------------------------------------------------------

    def working_memory(
        self, model: Model, request: TokenAttribution, share: int | None = None
    ) -> Estimate:
        """Checks the request's bounds and estimates its peak working memory: one pass of
        the rows `attribute` puts in a pass, with their gradients."""
        slot = token_input(model)
        count = 0 if request.continuation is None else int(request.continuation.numel())
        steps = check_request(request, count)
        length = int(request.prompt.numel()) + max(count - 1, 0)
        check_length(model, slot, int(request.prompt.numel()), length)
        row = 2 * self._row_bytes(model, slot, length)  # a row's values and their gradients
        rows = min(self._per_pass(request, row, share), max(count, 1) * (steps or 1))
        return Estimate(rows * row + OVERHEAD_BYTES, "internal_batch_size")

    @staticmethod
    def _per_pass(request: TokenAttribution, row: int, share: int | None) -> int:
        """Rows per pass: the caller's, or as many as the activation limit (or the share of
        the budget, if smaller) allows; never over the share."""
        limit = ACTIVATION_BUDGET_BYTES if share is None else min(share, ACTIVATION_BUDGET_BYTES)
        fits = max(1, limit // max(row, 1))
        asked = request.internal_batch_size or fits
        return asked if share is None else min(asked, fits)

    def _attribute(
        self, model: Model, request: TokenAttribution, should_stop: ShouldStop, share: int | None
    ) -> TokensAttributed:
        started = time.perf_counter()
        slot = token_input(model)
        prompt = request.prompt
        continuation = request.continuation
        count = 0 if continuation is None else int(continuation.numel())
        steps = check_request(request, count)
        sequence = prompt if continuation is None else torch.cat([prompt, continuation[:-1]])
        length = int(sequence.numel())
        check_length(model, slot, int(prompt.numel()), length)
        node = self._node(model, slot, request.node)
        check_token_ids(model, slot, request.prompt, request.continuation, request.baseline_token)
        objective = request.objective
        if continuation is None:
            if objective is None:
                raise error(
                    "without a continuation, attribute_tokens attributes an objective: give one",
                    "OBJECTIVE_REQUIRED",
                    "objective",
                )
            self._check_objective(model, slot, objective, length)
            groups = [_Group(length, ())]
        else:
            assert continuation is not None
            check_continuation(model, slot, continuation)
            size = prompt.numel()
            tokens = [int(t) for t in continuation.tolist()]
            # One continuation token is one sequence either way; more share one sequence
            # where the model is causal, else each gets its own, as in Captum's loop.
            if count == 1 or self._is_causal(model, slot, sequence, should_stop):
                groups = [_Group(length, tuple((t, size - 1 + k) for k, t in enumerate(tokens)))]
            else:
                groups = [_Group(size + k, ((t, size - 1 + k),)) for k, t in enumerate(tokens)]
        rows = sum(max(len(g.scored), 1) for g in groups) * (steps or 1)
        batch = model.inputs[slot].dims[0]
        most = 1 if batch.size is not None else batch.max
        per_pass = self._per_pass(request, 2 * self._row_bytes(model, slot, length), share)
        per_pass = max(1, min(per_pass, rows, most if most is not None else rows))
        scores = []
        values: list[float] = []
        passes = 0
        for group in groups:
            if should_stop():
                raise Cancelled("the call was cancelled", reason="CANCELLED")
            ids = sequence[: group.length]
            part, value, ran = self._group(
                model, slot, node, ids, group, request, steps, per_pass, should_stop
            )
            scores.append(part[:, : prompt.numel()])
            values += value
            passes += ran
        attributed = torch.cat(scores).detach().to("cpu").contiguous()
        return TokensAttributed(
            scores=attributed,
            values=values,
            node=node,
            device=str(self.engine.device),
            passes=passes,
            internal_batch_size=per_pass,
            compute_ms=(time.perf_counter() - started) * 1e3,
        )

    def _node(self, model: Model, slot: int, name: str) -> str:
        if not name:
            found = token_embedding(model, slot)
            if found is None:
                raise error(
                    f"{model.name} has no embedding of its token ids that gradtap can find: "
                    "name the node to attribute to",
                    "LAYER_REQUIRED",
                    "node",
                )
            return found
        node = model.resolve(name)
        if node is None:
            raise error(
                f"unknown node {name[:80]!r}: not a graph node or module path of {model.name} "
                "(DescribeModel lists them)",
                "UNKNOWN_TARGET",
                "node",
            )
        info = model.nodes[node]
        if not info.differentiable:
            raise error(
                f"node {name[:80]!r} has dtype {dtype_name(info.spec.dtype)}; it has no gradient",
                "NOT_DIFFERENTIABLE",
                "node",
            )
        ids = model.inputs[slot].dims
        dims = info.spec.dims
        if len(dims) < 2 or dims[0].symbol != ids[0].symbol or dims[1].symbol != ids[1].symbol:
            raise error(
                f"node {name[:80]!r} is not shaped (N, S, ...), batch then sequence, like the "
                "token ids: token attribution reads one value per token there",
                "WRONG_SHAPE",
                "node",
            )
        return node

    def _check_objective(self, model: Model, slot: int, objective: Objective, length: int) -> None:
        if objective.node:
            site = model.resolve(objective.node)
            if site is None:
                raise error(
                    f"unknown objective node {objective.node[:80]!r}",
                    "UNKNOWN_TARGET",
                    f"{objective.field}.site.node",
                )
            spec = model.nodes[site].spec
        elif objective.output < len(model.outputs):
            spec = model.outputs[objective.output]
        else:
            raise error(
                f"output {objective.output} does not exist: {model.name} has "
                f"{len(model.outputs)} output(s)",
                "UNKNOWN_OUTPUT",
                f"{objective.field}.site.output",
            )
        check(objective, shape_of(spec, bound(model, slot, 1, length)), spec.dtype)

    # -- causality --------------------------------------------------------------------------

    def _is_causal(
        self, model: Model, slot: int, sequence: torch.Tensor, should_stop: ShouldStop
    ) -> bool:
        """Whether output 0's value at each position depends only on the tokens up to it:
        measured once per model, on this sequence and the same less its last token."""
        key = (model.name, model.digest)
        known = self._causal.get(key)
        if known is not None or sequence.numel() < 2:
            return True if known is None else known
        full = self._outputs(model, slot, sequence, should_stop)
        shorter = self._outputs(model, slot, sequence[:-1], should_stop)
        a, b = full[0, :-1], shorter[0]
        scale = float(a.abs().max()) if a.numel() else 1.0
        causal = a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))
        with self._lock:
            self._causal[key] = causal
        return causal

    def _outputs(
        self, model: Model, slot: int, ids: torch.Tensor, should_stop: ShouldStop
    ) -> torch.Tensor:
        outcome = self.engine.analyze(
            model, Analysis(inputs=fill(model, slot, ids[None]), outputs=True), should_stop
        )
        return next(c.tensor for c in outcome.tensors if c.role is Role.OUTPUT and c.index == 0)

    # -- the passes -------------------------------------------------------------------------

    def _row_bytes(self, model: Model, slot: int, length: int) -> int:
        """The bytes of every node's value for one row of `length` tokens (kept per model and
        length: the sum runs over every node's symbolic shape)."""
        key = (model.name, model.digest, length)
        found = self._rows.get(key)
        if found is None:
            symbols = bound(model, slot, 1, length)
            found = 0
            for info in model.nodes.values():
                sizes = shape_of(info.spec, symbols)
                found += math.prod(s or 1 for s in sizes) * info.spec.dtype.itemsize
            found = max(found, 1)
            with self._lock:
                if len(self._rows) >= 1024:
                    self._rows.clear()
                self._rows[key] = found
        return found

    def _value(self, model: Model, slot: int, node: str, ids: torch.Tensor) -> torch.Tensor:
        """The node's value for one sequence, (L, ...), without gradients."""
        outcome = self.engine.analyze(
            model,
            Analysis(
                inputs=fill(model, slot, ids[None]),
                targets=[Target(node, activation=True, gradient=False)],
            ),
        )
        return outcome.tensors[0].tensor[0].to(self.engine.device)

    def _graph(self, model: Model, node: str, captures: tuple[str, ...]) -> torch.fx.GraphModule:
        key = (model.name, model.digest, node, captures)
        with self._lock:
            module = self._graphs.get(key)
        if module is None:
            module = graph.substituted(model, node, captures)
            with self._lock:
                if len(self._graphs) >= 16:
                    for old in self._graphs.values():
                        graph.release(old)
                    self._graphs.clear()
                module = self._graphs.setdefault(key, module)
        return module

    def _group(
        self,
        model: Model,
        slot: int,
        node: str,
        ids: torch.Tensor,
        group: _Group,
        request: TokenAttribution,
        steps: int | None,
        per_pass: int,
        should_stop: ShouldStop,
    ) -> tuple[torch.Tensor, list[float], int]:
        """One group's attribution, (scored tokens or 1, L), its values and its pass count."""
        device = self.engine.device
        ids = ids.to(device)
        x = self._value(model, slot, node, ids)
        ig = request.method == "integrated_gradients"
        if ig:
            baseline_ids = ids.clone()
            baseline_ids[: request.prompt.numel()] = request.baseline_token
            base = self._value(model, slot, node, baseline_ids)
            assert steps is not None
            sizes, alphas = approximation_parameters(request.integration_method)
            weights, points = list(sizes(steps)), list(alphas(steps))
        else:
            base = torch.zeros_like(x)
            weights, points = [1.0], [1.0]
        targets = group.scored or ((-1, -1),)
        objective = request.objective
        captures: tuple[str, ...] = ()
        if objective is not None and objective.node:
            captures = (model.resolve(objective.node) or "",)
        module = self._graph(model, node, captures)
        state = [v for _, v, _ in model.state]
        # Rows are (scored token, step) pairs, token-major.
        rows = [(t, s) for t in range(len(targets)) for s in range(len(points))]
        total = torch.zeros((len(targets), *x.shape), dtype=x.dtype, device=device)
        values = [math.nan] * len(targets)
        passes = 0
        for start in range(0, len(rows), per_pass):
            if should_stop():
                raise Cancelled("the call was cancelled", reason="CANCELLED")
            chunk = rows[start : start + per_pass]
            alpha = torch.tensor([points[s] for _, s in chunk], dtype=x.dtype, device=device)
            shape = (len(chunk),) + (1,) * x.dim()
            value = (base + alpha.view(shape) * (x - base)).detach().requires_grad_(True)
            inputs = fill(model, slot, ids.expand(len(chunk), -1))
            with torch.enable_grad():
                graph.watch(should_stop)
                try:
                    flat = module.forward(*state, *inputs, value)
                except (RuntimeError, IndexError, ValueError) as e:
                    if isinstance(e, torch.OutOfMemoryError):
                        raise
                    raise error(
                        f"the model could not run on these tokens ({type(e).__name__}); check "
                        "that the token ids lie within the vocabulary",
                        "MODEL_REJECTED_INPUT",
                        "prompt",
                    ) from e
                finally:
                    graph.watch(None)
                n_out = len(model.output_positions)
                per_row = self._scores(
                    model, flat, n_out, objective, [targets[t] for t, _ in chunk]
                )
                (gradient,) = torch.autograd.grad(per_row.sum(), value)
            passes += 1
            weight = torch.tensor([weights[s] for _, s in chunk], dtype=x.dtype, device=device)
            index = torch.tensor([t for t, _ in chunk], device=device)
            total.index_add_(0, index, gradient.detach() * weight.view(shape))
            if not ig:
                for (t, _), v in zip(chunk, per_row.detach().tolist()):
                    values[t] = v
        if request.method == "input_x_gradient":
            attributed = total * x
        elif ig:
            attributed = total * (x - base)
            values = self._values(model, slot, ids, targets, objective, captures)
        else:
            attributed = total
        hidden = tuple(range(2, attributed.dim()))
        if not hidden:
            return attributed, values, passes
        if request.aggregate == "l2":
            return torch.linalg.vector_norm(attributed, dim=hidden), values, passes
        return attributed.sum(dim=hidden), values, passes

    def _scores(
        self,
        model: Model,
        flat: Sequence[torch.Tensor],
        n_out: int,
        objective: Objective | None,
        scored: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Each row's scalar: the log-probability of its token, or the objective on it."""
        if objective is None:
            logits = flat[0]
            rows = torch.arange(len(scored), device=logits.device)
            at = torch.tensor([p for _, p in scored], device=logits.device)
            tokens = torch.tensor([t for t, _ in scored], device=logits.device)
            picked = logits[rows, at].log_softmax(dim=-1)
            return picked.gather(-1, tokens[:, None])[:, 0]
        site = flat[n_out] if objective.node else flat[objective.output]
        return torch.stack([loss(objective, site[r : r + 1]) for r in range(site.shape[0])])

    def _values(
        self,
        model: Model,
        slot: int,
        ids: torch.Tensor,
        targets: Sequence[tuple[int, int]],
        objective: Objective | None,
        captures: tuple[str, ...],
    ) -> list[float]:
        """The scored values at the actual tokens (integration steps never reach them)."""
        outcome = self.engine.analyze(
            model,
            Analysis(
                inputs=fill(model, slot, ids[None]),
                targets=[Target(n, activation=True, gradient=False) for n in captures],
                outputs=True,
            ),
        )
        flat = [c.tensor for c in outcome.tensors if c.role is Role.OUTPUT]
        flat += [c.tensor for c in outcome.tensors if c.role is Role.ACTIVATION]
        if objective is None:
            flat = [flat[0].expand(len(targets), *flat[0].shape[1:])]
        scores = self._scores(model, flat, len(model.outputs), objective, list(targets))
        return [float(v) for v in scores.tolist()]

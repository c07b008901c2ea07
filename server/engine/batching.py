"""Dynamic batching: concurrent compatible requests share one forward and backward pass.

Merging is exact only when no sample influences another. A request is batched when
- its model has one dynamic batch dimension shared by every input, and every node it
  touches (targets, the objective's site, the outputs) carries that dimension first;
- the model's graph never mixes samples (see `mixes_samples`) and the model did not opt out;
- it asks for no parameter gradients and no reductions.
Compatible requests (same model, targets, objective kind and site, flags and per-sample
shapes) are concatenated along dimension 0; the objective is the sum of each request's own
objective on its rows, so each request's gradients are exactly its unbatched gradients.
Where the model declares how to pad (server/models/padding.py), requests of different
sequence lengths are compatible too: each is padded to the longest, and its results and
objective are cut back to its own positions (engine/padded.py).
Everything else runs alone, unchanged.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import Cancelled, RequestError
from ..models.model import Model, Spec
from .analysis import Analysis, Collected, Engine, Outcome, Role
from .graph import ShouldStop
from .objectives import Objective, trimmed
from .padded import Padder, padder, trimmable

BatchObserver = Callable[[int], None]


def batch_symbol(model: Model) -> str | None:
    """The symbol of the batch dimension every input shares, if there is one."""
    symbols = {
        spec.dims[0].symbol if spec.dims and spec.dims[0].size is None else ""
        for spec in model.inputs
    }
    if len(symbols) != 1:
        return None
    symbol = symbols.pop()
    return symbol or None


def mixes_samples(model: Model, symbol: str) -> bool:
    """True when some value computed from the inputs loses the batch dimension and then
    flows into per-sample values again (a mean over the batch, train-mode batch norm...).

    Such a graph couples samples, so merging requests would change their results.
    """
    graph = model.program.graph
    batched = {
        n
        for n, info in model.nodes.items()
        if info.spec.dims and info.spec.dims[0].symbol == symbol
    }
    for node in graph.nodes:
        if node.op != "call_function" or node.name not in model.input_dependent:
            continue
        if node.name in batched or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if any(user.name in batched for user in node.users):
            return True
    return False


_SITES_KEPT = 4096
"""Eligibility answers kept, over all models (cleared when full)."""


def _batch_first(
    model: Model, symbol: str, targets: tuple[str, ...], site: tuple[str, int] | None
) -> bool | None:
    """True when every targeted node, the objective's site and every output carry the batch
    dimension first. None for an unknown name or output: such requests run alone (and fail
    there), and neither keys nor the cache of answers ever hold what does not resolve."""
    nodes = [model.resolve(name) for name in targets]
    if site is not None:
        site_node, output = site
        if site_node:
            nodes.append(model.resolve(site_node))
        elif output >= len(model.outputs):
            return None
    for node in nodes:
        info = model.nodes.get(node or "")
        if info is None:
            return None
        if not info.spec.dims or info.spec.dims[0].symbol != symbol:
            return False
    sited = [] if site is None or site[0] else [model.outputs[site[1]]]
    return all(s.dims and s.dims[0].symbol == symbol for s in [*model.outputs, *sited])


@dataclass
class _Pending:
    analysis: Analysis
    rows: int
    should_stop: ShouldStop
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    outcome: Outcome | None = None
    error: BaseException | None = None


@dataclass
class _Queue:
    key: tuple[Any, ...]
    most_rows: int
    """Rows one merged pass may hold (see Batcher._most_rows)."""
    pending: list[_Pending] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)


class Batcher:
    """Runs analyses through the engine, merging concurrent compatible ones.

    The first request of a batch leads it: it waits up to `timeout_us` for companions (or
    until `max_batch_size` rows have gathered), runs the merged pass and hands each
    follower its share. No extra threads are involved. A request arriving while no other
    is in flight (nor was lately) runs at once, unless `always_wait`: then every request
    waits for companions, so that what merges does not depend on timing (tests).
    """

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 16,
        timeout_us: int = 2000,
        observe: BatchObserver | None = None,
        always_wait: bool = False,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.timeout = timeout_us / 1e6
        self.observe = observe
        self._lock = threading.Lock()
        self._queues: dict[tuple[Any, ...], _Queue] = {}
        self._symbols: dict[int, str | None] = {}
        """Model.key -> its batch symbol, or None when it cannot be batched."""
        self._padders: dict[int, Padder | None] = {}
        """Model.key -> how its requests of different lengths are padded, if they can be."""
        self._batched_sites: dict[tuple[Any, ...], tuple[bool, bool]] = {}
        """(Model.key, target names, objective site) -> whether all carry the batch dim, and
        whether all can be trimmed to a padded request's own positions; only for names that
        resolve."""
        self._active = 0
        self._window = max(0.01, 5 * self.timeout)
        self._always_wait = always_wait
        self._overlapped_at = -math.inf
        """When a request last arrived with another one in flight."""

    # -- eligibility ------------------------------------------------------------------------

    def _symbol(self, model: Model) -> str | None:
        """The model's batch symbol, or None when it cannot be batched at all (cached)."""
        key = model.key
        if key not in self._symbols:
            symbol = batch_symbol(model)
            if symbol is not None and (not model.batchable or mixes_samples(model, symbol)):
                symbol = None
            self._symbols[key] = symbol
            self._padders[key] = None if symbol is None else padder(model, symbol)
        return self._symbols[key]

    def _key(self, model: Model, analysis: Analysis) -> tuple[Any, ...] | None:
        """Requests with equal keys can share a pass; None means run alone."""
        if self.max_batch_size <= 1 or getattr(analysis, "param_grads", None):
            return None
        if getattr(analysis, "corrupt_inputs", None):  # attribution patching runs alone
            return None
        symbol = self._symbol(model)
        if symbol is None or len(analysis.inputs) != len(model.inputs):
            return None
        if any(getattr(t, "reduction", None) is not None for t in analysis.targets):
            return None
        if any(t.dim() == 0 for t in analysis.inputs):
            return None
        rows = {t.shape[0] for t in analysis.inputs}
        if len(rows) != 1 or rows.pop() >= self.max_batch_size:
            return None
        objective = analysis.objective
        if objective is not None and objective.tensor is not None:
            if (
                objective.tensor.dim() == 0
                or objective.tensor.shape[0] != analysis.inputs[0].shape[0]
            ):
                return None
        targets = tuple((t.name, t.activation, t.gradient) for t in analysis.targets)
        site = None if objective is None else (objective.node, objective.output)
        sites = (model.key, tuple(name for name, _, _ in targets), site)
        answer = self._batched_sites.get(sites)
        if answer is None:
            batched = _batch_first(model, symbol, sites[1], site)
            if batched is None:
                return None
            answer = (batched, batched and self._trimmable(model, sites[1], site))
            if len(self._batched_sites) >= _SITES_KEPT:
                self._batched_sites.clear()
            self._batched_sites[sites] = answer
        batched, padded = answer
        if not batched:
            return None
        pad = self._padders.get(model.key) if padded else None
        shapes = [list(t.shape[1:]) for t in analysis.inputs]
        if pad is not None:  # any length: the sequence dimensions merge padded
            for shape, dims in zip(shapes, pad.dims):
                for d in dims:
                    shape[d - 1] = -1
        return (
            model.key,
            targets,
            None
            if objective is None
            else (objective.kind, objective.output, objective.node, objective.reduction),
            analysis.input_gradients,
            analysis.outputs,
            analysis.autocast,
            tuple((t.dtype, tuple(shape)) for t, shape in zip(analysis.inputs, shapes)),
            None
            if objective is None or objective.tensor is None
            else (
                objective.tensor.dtype,
                objective.tensor.dim() if pad else tuple(objective.tensor.shape[1:]),
            ),
        )

    def _trimmable(
        self, model: Model, targets: tuple[str, ...], site: tuple[str, int] | None
    ) -> bool:
        """True when the model pads and every value a request touches can be cut back to
        its own positions (see engine/padded.py)."""
        pad = self._padders.get(model.key)
        if pad is None:
            return False
        names = [*targets, *([site[0]] if site is not None and site[0] else [])]
        specs = [model.nodes[model.resolve(name) or ""].spec for name in names]
        return all(trimmable(spec, pad.symbol) for spec in [*specs, *model.outputs])

    def forget(self, model: Model) -> None:
        """Drops the eligibility answers kept for `model`, once no call runs on it."""
        self._symbols.pop(model.key, None)
        self._padders.pop(model.key, None)
        for sites in [s for s in self._batched_sites if s[0] == model.key]:
            self._batched_sites.pop(sites, None)

    # -- running ----------------------------------------------------------------------------

    def analyze(self, model: Model, analysis: Analysis, should_stop: ShouldStop) -> Outcome:
        """The request's outcome, computed alone or as part of a merged pass."""
        key = self._key(model, analysis)
        if key is None:
            return self._alone(model, analysis, should_stop)
        with self._lock:
            self._active += 1
            now = time.monotonic()
            if self._active > 1:
                self._overlapped_at = now
            # Waiting for companions only pays when requests overlap; a lone caller
            # (no other request in flight lately) runs at once, paying no delay.
            wait = self._always_wait or self._overlapped_at >= now - self._window
            queue = self._queues.get(key)
            if queue is None and wait:
                queue = self._queues[key] = _Queue(key, self._most_rows(model))
        try:
            if queue is None:
                # Alone, with nobody to wait for and no batch of its kind forming: it would
                # lead a batch of one, so it skips the queue.
                if should_stop():
                    raise Cancelled("the call was cancelled", reason="CANCELLED")
                return self._alone(model, analysis, should_stop)
            me = _Pending(analysis, int(analysis.inputs[0].shape[0]), should_stop)
            with queue.arrived:
                queue.pending.append(me)
                leader = len(queue.pending) == 1
                queue.arrived.notify_all()
            if not leader:
                me.done.wait()
                if me.lead:  # promoted: lead the requests that did not fit the last batch
                    me.done.clear()
                    leader = True
            if leader:
                self._run(model, self._gather(queue, wait))
            if me.error is not None:
                raise me.error
            assert me.outcome is not None
            return me.outcome
        finally:
            with self._lock:
                self._active -= 1

    def _most_rows(self, model: Model) -> int:
        """max_batch_size, or fewer where the model's batch range ends below it: the engine
        trusts that inputs fit the model, and a merged request is checked by nobody else."""
        most = model.inputs[0].dims[0].max
        return self.max_batch_size if most is None else min(self.max_batch_size, most)

    def _gather(self, queue: _Queue, wait: bool) -> list[_Pending]:
        """The leader waits for companions, then takes up to `queue.most_rows` rows."""
        deadline = time.monotonic() + (self.timeout if wait else 0.0)
        with queue.arrived:
            while True:
                rows = sum(p.rows for p in queue.pending)
                left = deadline - time.monotonic()
                if rows >= queue.most_rows or left <= 0:
                    break
                queue.arrived.wait(left)
            batch: list[_Pending] = []
            total = 0
            for p in queue.pending:
                if total + p.rows > queue.most_rows and batch:
                    break
                batch.append(p)
                total += p.rows
            del queue.pending[: len(batch)]
            if queue.pending:  # the first of those left behind leads the next batch
                queue.pending[0].lead = True
                queue.pending[0].done.set()
            else:
                self._drop(queue)
        return batch

    def _drop(self, queue: _Queue) -> None:
        """Forgets an empty queue, so that keys never pile up. A request that picked the
        queue up just before leads it alone; the next one starts a fresh queue."""
        with self._lock:
            if self._queues.get(queue.key) is queue:
                del self._queues[queue.key]

    def _alone(self, model: Model, analysis: Analysis, should_stop: ShouldStop) -> Outcome:
        if self.observe is not None:
            self.observe(1)
        return self.engine.analyze(model, analysis, should_stop)

    def _run(self, model: Model, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.should_stop()]
        try:
            if len(live) == 1:
                live[0].outcome = self._alone(model, live[0].analysis, live[0].should_stop)
            elif live:
                # on a compute thread, with the merged pass: concatenating and slicing big
                # batches runs torch's parallel kernels too (see engine/compute.py)
                self.engine.compute.run(self._merged, model, live)
        except RequestError as e:
            if len(live) == 1:  # it ran alone: the error is its own
                live[0].error = e
                return
            # One request's objective did not fit: give each its own answer and error.
            for p in live:
                try:
                    p.outcome = self._alone(model, p.analysis, p.should_stop)
                except BaseException as e:  # noqa: BLE001 - handed to that request's thread
                    p.error = e
        except BaseException as e:  # noqa: BLE001 - shared failure, shared answer
            for p in live:
                p.error = e
        finally:
            for p in batch:
                if p.outcome is None and p.error is None:
                    p.error = Cancelled("the call was cancelled", reason="CANCELLED")
                p.done.set()

    def _merged(self, model: Model, live: list[_Pending]) -> None:
        first = live[0].analysis
        pad = self._padders.get(model.key)
        lengths = [pad.length(p.analysis.inputs) if pad else 0 for p in live]
        longest = max(lengths)
        each = [p.analysis.inputs for p in live]
        if pad is not None and min(lengths) != longest:
            each = [pad.pad(p.analysis.inputs, longest) for p in live]
        else:
            pad = None
        inputs = [torch.cat([e[i] for e in each]) for i in range(len(first.inputs))]
        objective = None
        if first.objective is not None:
            site = _site_spec(model, first.objective)
            parts: list[tuple[int, int, Objective]] = []
            start = 0
            for p, length in zip(live, lengths):
                own = p.analysis.objective
                assert own is not None
                if pad is not None:
                    own = replace(own, trim=pad.trim(site, length, longest))
                parts.append((start, start + p.rows, own))
                start += p.rows
            objective = replace(first.objective, tensor=None, parts=tuple(parts))
        merged = replace(first, inputs=inputs, objective=objective)
        rows = sum(p.rows for p in live)
        if self.observe is not None:
            self.observe(rows)
        outcome = self.engine.analyze(model, merged, lambda: all(p.should_stop() for p in live))
        outcome.batch_size = len(live)
        start = 0
        for i, (p, length) in enumerate(zip(live, lengths)):
            share = slice(start, start + p.rows)
            start += p.rows
            p.outcome = Outcome(
                tensors=[
                    _slice(c, share, pad.trim(_spec(model, c), length, longest) if pad else ())
                    for c in outcome.tensors
                ],
                loss=outcome.part_losses[i] if outcome.part_losses else outcome.loss,
                device=outcome.device,
                timings=outcome.timings,
                batch_size=outcome.batch_size,
                precision=outcome.precision,
            )


def _slice(c: Collected, rows: slice, trim: tuple[tuple[int, int, int], ...]) -> Collected:
    return Collected(c.role, c.name, c.index, trimmed(c.tensor[rows], trim).contiguous())


def _site_spec(model: Model, objective: Objective) -> Spec:
    if objective.node:
        return model.nodes[model.resolve(objective.node) or ""].spec
    return model.outputs[objective.output]


def _spec(model: Model, c: Collected) -> Spec:
    """The spec of a merged result's tensor (merged requests ask for no reductions)."""
    if c.role is Role.OUTPUT:
        return model.outputs[c.index]
    if c.role is Role.INPUT_GRADIENT:
        return model.inputs[c.index]
    return model.nodes[model.resolve(c.name) or ""].spec


__all__: Sequence[str] = ["Batcher", "batch_symbol", "mixes_samples"]

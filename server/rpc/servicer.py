"""The servicer, thin: each RPC resolves its model, decodes (wire), runs (engine), encodes (wire).

Errors leave every method through `status_mapped` (rpc/status.py), the one place where
exceptions become status codes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ..engine import memory
from ..engine.adversarial import perturb
from ..engine.aggregate import Aggregator
from ..engine.analysis import Engine
from ..engine.attribution import attribute, working_memory
from ..engine.batching import Batcher
from ..engine.tokens import TokenAttributor
from ..models.model import Model
from ..models.registry import Registry
from ..wire import requests, responses, shm, tokens
from ..wire.requests import Limits
from . import deadline
from .release import Releaser
from .status import status_mapped


def replica_id() -> str:
    """This process, as "<host>:<pid>"."""
    return f"{socket.gethostname()}:{os.getpid()}"


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Implements gradtap.v1.GradientService over a registry of models and an engine."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        limits: Limits | None = None,
        batcher: Batcher | None = None,
        budget: memory.MemoryBudget | None = None,
    ) -> None:
        self.registry = registry
        self.budget = budget
        """The memory budget calls hold their estimate from (None: unbounded)."""
        self.engine = engine
        self.run = batcher.analyze if batcher is not None else engine.analyze
        self.limits = limits or Limits()
        self.replica = replica_id()
        self._releaser = Releaser()
        self._tokens = TokenAttributor(engine)

    def close(self) -> None:
        """Releases what finished calls left behind; call it once the server has stopped."""
        self._releaser.close()

    def _held(
        self, estimate: memory.Estimate, what: str, should_stop: Callable[[], bool]
    ) -> AbstractContextManager[None]:
        """Holds the call's estimated working memory for the block, waiting for it until
        `should_stop` (the call's time limit, inside whose block this is entered): a call
        that could never fit is refused at once."""
        if self.budget is None:
            return contextlib.nullcontext()
        return self.budget.hold(estimate, what, should_stop)

    def _share(self) -> int | None:
        return None if self.budget is None else self.budget.share

    @status_mapped
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return responses.model_list(self.registry)

    @status_mapped
    def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
    ) -> pb.DescribeModelResponse:
        with requests.model(self.registry, request.model) as model:
            return responses.description(model, self.registry.status(model.name))

    @status_mapped
    def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        with requests.model(self.registry, request.model) as model:
            call = requests.analyze(request, model, self.limits, peer=context.peer)
            estimate = memory.analysis_bytes(model, call.analysis)
            opened = shm.opened(call.region) if call.region else contextlib.nullcontext()
            with (
                deadline.time_limit(context) as should_stop,
                self._held(estimate, "this Analyze call", should_stop),
            ):
                with opened as region:
                    decoded = time.perf_counter()
                    outcome = self.run(model, call.analysis, should_stop=should_stop)
                    self._releaser.free_after_call(context, outcome)
                    summary = responses.analyze_summary(
                        outcome, model, self.replica, started, decoded
                    )
                    if region is not None:
                        yield responses.written(outcome, region, summary, call.tokenized)
                        return
                yield from responses.analyze_stream(outcome, summary, call.tokenized)

    @status_mapped
    def AnalyzeMany(
        self, items: Iterator[pb.AnalyzeManyRequest], context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        # the first item's model, held for every item
        with contextlib.ExitStack() as holding, deadline.time_limit(context) as should_stop:
            yield from self._many(items, holding, should_stop)

    def _many(
        self,
        items: Iterator[pb.AnalyzeManyRequest],
        holding: contextlib.ExitStack,
        should_stop: Callable[[], bool],
    ) -> Iterator[Any]:
        stream_started = time.perf_counter()
        omit = False
        aggregator: Aggregator | None = None
        model: Model | None = None
        device, precision = str(self.engine.device), ""
        for k, request in enumerate(items):
            started = time.perf_counter()
            if k == 0:
                options = requests.many_options(request)
                omit = options.omit_items
                aggregator = Aggregator() if options.aggregate else None
            with requests.item(k):
                if model is None:
                    model = holding.enter_context(requests.model(self.registry, request.item.model))
                analysis = requests.many_item(
                    request, model, self.limits, aggregate=aggregator is not None
                )
                decoded = time.perf_counter()
                estimate = memory.analysis_bytes(model, analysis)
            # Each item holds its working memory until its results are sent, and no longer.
            with self._held(estimate, f"item {k} of this AnalyzeMany call", should_stop):
                with requests.item(k):
                    outcome = self.engine.analyze(model, analysis, should_stop=should_stop)
                    if aggregator is not None:
                        self.engine.compute.run(aggregator.add, analysis, outcome)
                device, precision = outcome.device, outcome.precision
                yield from responses.many_item(
                    k, outcome, model, self.replica, started, decoded, omit=omit
                )
                del outcome
        if aggregator is not None and model is not None:
            yield from responses.many_aggregate(
                aggregator, model, self.replica, device, precision, stream_started
            )

    @status_mapped
    def Attribute(
        self, request: pb.AttributeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        with requests.model(self.registry, request.model) as model:
            attribution = requests.attribution(request, model, self.limits)
            share = self._share()
            estimate = working_memory(model, attribution, share)
            with (
                deadline.time_limit(context) as should_stop,
                self._held(estimate, f"this {attribution.method} call", should_stop),
            ):
                outcome = self.engine.compute.run(
                    attribute, self.engine.device, model, attribution, should_stop, share
                )
                yield from responses.attribute_stream(outcome, model, self.replica, started)

    @status_mapped
    def Perturb(
        self, request: pb.PerturbRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        with requests.model(self.registry, request.model) as model:
            perturbation = requests.perturbation(request, model, self.limits)
            estimate = memory.perturbation_bytes(model, perturbation.inputs)
            with (
                deadline.time_limit(context) as should_stop,
                self._held(estimate, f"this {perturbation.method} call", should_stop),
            ):
                steps = perturb(self.engine, model, perturbation, should_stop=should_stop)
                # each step on a compute thread, other calls' computations in between
                steps = self.engine.compute.iterate(steps)
                yield from responses.perturb_stream(steps, model, self.replica, started)

    @status_mapped
    def AttributeTokens(
        self, request: pb.AttributeTokensRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        with requests.model(self.registry, request.model) as model:
            given = tokens.texts(request, model)
            attribution = tokens.attribution(request, model, self.limits, given)
            share = self._share()
            estimate = self._tokens.working_memory(model, attribution, share)
            with (
                deadline.time_limit(context) as should_stop,
                self._held(estimate, "this AttributeTokens call", should_stop),
            ):
                outcome = self.engine.compute.run(
                    self._tokens.attribute, model, attribution, should_stop, share
                )
                yield from tokens.stream(outcome, model, self.replica, started, given)

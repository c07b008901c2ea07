"""Prometheus metrics and one JSON log line per call, from the outermost server interceptor."""

from __future__ import annotations

import collections
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine.memory import MemoryBudget
from ..models.registry import Registry
from ..models.versions import State
from .handlers import behaviour_of, same_kind

request_log = logging.getLogger("gradtap.requests")

REQUEST_ID_KEY = "x-request-id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
UNKNOWN_MODEL = "(unknown)"
"""The model label of calls that name no served model: a caller cannot mint label values."""

AUDITED_PREFIX = "gradtap.v1.ModelService/"
"""Calls whose log line carries an audit record: every model-control call, refused or not."""

# Probes poll these every few seconds; their log lines go out at DEBUG, not INFO.
_QUIET_PREFIXES = ("grpc.health.v1.Health/",)
_LOGGED_NAME_CHARS = 128

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUEUE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The gradtap_* metrics on one registry, so that several servers in a process don't clash."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gradtap_requests_total",
            "Finished calls, by method, model and final gRPC status code.",
            ["rpc", "model", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "gradtap_request_seconds",
            "Time from a call's arrival to its final status, queue time included.",
            ["rpc", "model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "gradtap_queue_seconds",
            "Time from a call's arrival to its handler starting work (thread pool and admission).",
            ["rpc"],
            buckets=_QUEUE_SECONDS,
            registry=registry,
        )
        self.streamed_bytes = Counter(
            "gradtap_streamed_bytes_total",
            "Serialized size of the response messages sent.",
            ["rpc", "model"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "gradtap_batch_size",
            "Requests per batch run by the dynamic batcher.",
            buckets=_BATCH_SIZES,
            registry=registry,
        )
        self.in_flight = Gauge(
            "gradtap_in_flight_requests",
            "Calls whose handler is running.",
            ["rpc"],
            registry=registry,
        )
        if torch.cuda.is_available():
            registry.register(CudaMemory())


class CudaMemory:
    """torch's CUDA caching-allocator numbers, read at scrape time, one series per device."""

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        allocated, reserved = self._families()
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            allocated.add_metric([device], torch.cuda.memory_allocated(index))
            reserved.add_metric([device], torch.cuda.memory_reserved(index))
        return allocated, reserved

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "gradtap_cuda_memory_allocated_bytes",
                "Bytes held by tensors (torch.cuda.memory_allocated).",
                labels=["device"],
            ),
            GaugeMetricFamily(
                "gradtap_cuda_memory_reserved_bytes",
                "Bytes reserved by the caching allocator (torch.cuda.memory_reserved).",
                labels=["device"],
            ),
        )


class MemoryMetrics:
    """The memory budget's numbers, read at scrape time (engine/memory.py)."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for family, value in zip(families, (self.budget.total, self.budget.held, self.budget.peak)):
            family.add_metric([], value)
        return families

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "gradtap_memory_budget_bytes", "The memory budget (gradtap serve --memory-budget)."
            ),
            GaugeMetricFamily(
                "gradtap_memory_held_bytes",
                "Estimated working memory held by running calls and model loads now.",
            ),
            GaugeMetricFamily(
                "gradtap_memory_held_peak_bytes",
                "The most estimated working memory held at once since the server started.",
            ),
        )


class ModelMetrics:
    """The registry's numbers, read at scrape time: loads by result, versions by state and
    calls routed to each version."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        loads, versions, calls = self._families()
        loaded, served = self.registry.counts()
        for (model, source, result), count in sorted(loaded.items()):
            loads.add_metric([model, source, result], count)
        for status in self.registry.statuses():
            states = collections.Counter(v.state for v in status.versions)
            for state in State:
                versions.add_metric([status.name, state.value], states[state])
        for (model, version), count in sorted(served.items()):
            calls.add_metric([model, version], count)
        return loads, versions, calls

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "gradtap_model_loads",
                "Finished loads of a model version, by source and result (ready or failed).",
                labels=["model", "source", "result"],
            ),
            GaugeMetricFamily(
                "gradtap_model_versions",
                "Versions of each model in each state (LOADING, READY, FAILED, UNLOADING).",
                labels=["model", "state"],
            ),
            CounterMetricFamily(
                "gradtap_model_version_calls",
                "Calls routed to each version of a model (while the version is loaded).",
                labels=["model", "version"],
            ),
        )


@dataclass
class _Call:
    """What the interceptor learns about one call while it runs."""

    rpc: str
    request_id: str
    arrived: float
    model: str = ""
    queued: float = 0.0
    bytes_sent: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    audit: dict[str, Any] = field(default_factory=dict)
    """What a model-control call did and who asked (see `audit`)."""


@dataclass
class _Series:
    """A method's (or a method and model's) labelled metrics."""

    in_flight: Any = None
    queue_seconds: Any = None
    request_seconds: Any = None
    streamed_bytes: Any = None


_current: ContextVar[_Call | None] = ContextVar("gradtap_current_call", default=None)


def observe_queue(seconds: float) -> None:
    """Adds a wait (e.g. in an admission queue) to the running call's queue time.

    Call it from the thread that serves the call, inside the interceptor chain; the queue
    histogram gets one observation per call, when the call finishes. Outside a call it does
    nothing.
    """
    call = _current.get()
    if call is not None:
        call.queued += seconds


def audit(**facts: Any) -> None:
    """Adds facts to the running call's audit record (model control: who, what, result),
    which its request log line carries as "audit". A "model" fact is also the call's model.
    Outside a call it does nothing."""
    call = _current.get()
    if call is not None:
        call.audit.update(facts)
        if isinstance(facts.get("model"), str):
            call.model = facts["model"]


def request_id_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's x-request-id when it is [A-Za-z0-9._-]{1,64}, else a fresh uuid4 hex."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class Observability(grpc.ServerInterceptor):  # type: ignore[misc]
    """Times, counts and logs every call, and returns its request id in trailing metadata.

    Put it first (outermost) in the chain so that calls refused by the inner interceptors
    are counted and logged too. `known_model`, when set, says which model names may become
    label values; other names are labelled "(unknown)".
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        known_model: Callable[[str], bool] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.known_model = known_model
        self._children: dict[tuple[str, str | None], _Series] = {}

    def observe_batch(self, size: int) -> None:
        """Records the size of one batch run by the dynamic batcher."""
        self.metrics.batch_size.observe(size)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        # grpcio calls interceptors on its polling thread when the call arrives, before it
        # queues the handler on the thread pool: the time until the handler runs is queue time.
        arrived = time.perf_counter()
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        rpc = handler_call_details.method.lstrip("/")
        request_id = request_id_from(handler_call_details.invocation_metadata)

        def call() -> _Call:
            return _Call(rpc=rpc, request_id=request_id, arrived=arrived)

        wrap = self._stream if handler.response_streaming else self._unary
        behaviour = wrap(call, behaviour_of(handler), streaming=bool(handler.request_streaming))
        return same_kind(handler, behaviour)

    def _unary(
        self, new_call: Callable[[], _Call], behaviour: Callable[..., Any], streaming: bool = False
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            call = self._begin(new_call())
            if streaming:
                request = _watch_requests(call, request)
            else:
                call.model = _model_name(request)
            try:
                response = behaviour(request, context)
            except Exception:
                call.code = _failed_code(context)
                raise
            else:
                call.code = context.code() or grpc.StatusCode.OK
                call.bytes_sent = _size(response)
                return response
            finally:
                self._end(call, context)

        return unary

    def _stream(
        self, new_call: Callable[[], _Call], behaviour: Callable[..., Any], streaming: bool = False
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._begin(new_call())
            if streaming:
                request = _watch_requests(call, request)
            else:
                call.model = _model_name(request)
            responses = None
            try:
                responses = behaviour(request, context)
                for response in responses:
                    size = _size(response)
                    yield response
                    # grpcio asks for the next message only once this one went out.
                    call.bytes_sent += size
            except GeneratorExit:
                # grpcio stopped reading: the caller went away or the deadline passed.
                call.code = context.code() or _gone_code(context)
                raise
            except Exception:
                call.code = _failed_code(context)
                raise
            else:
                call.code = context.code() or grpc.StatusCode.OK
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()
                self._end(call, context)

        return stream

    def _begin(self, call: _Call) -> _Call:
        call.queued = time.perf_counter() - call.arrived
        self._series(call.rpc).in_flight.inc()
        _current.set(call)
        return call

    def _series(self, rpc: str, model: str | None = None) -> _Series:
        """The labelled metrics of a method (and model), looked up once: prometheus_client's
        labels() validates and locks on every call, a few microseconds each."""
        key = (rpc, model)
        series = self._children.get(key)
        if series is None:
            m = self.metrics
            if model is None:
                series = _Series(
                    in_flight=m.in_flight.labels(rpc), queue_seconds=m.queue_seconds.labels(rpc)
                )
            else:
                series = _Series(
                    request_seconds=m.request_seconds.labels(rpc, model),
                    streamed_bytes=m.streamed_bytes.labels(rpc, model),
                )
            self._children[key] = series
        return series

    def _end(self, call: _Call, context: grpc.ServicerContext) -> None:
        _current.set(None)
        _tag(context, call.request_id)
        seconds = time.perf_counter() - call.arrived
        model = self._model_label(call.model)
        method = self._series(call.rpc)
        by_model = self._series(call.rpc, model)
        method.in_flight.dec()
        self.metrics.requests.labels(call.rpc, model, call.code.name).inc()
        by_model.request_seconds.observe(seconds)
        method.queue_seconds.observe(call.queued)
        by_model.streamed_bytes.inc(call.bytes_sent)
        line = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": call.request_id,
            "rpc": call.rpc,
            "model": _shortened(call.model),
            "code": call.code.name,
            "duration_ms": round(seconds * 1e3, 3),
            "queue_ms": round(call.queued * 1e3, 3),
            "bytes_sent": call.bytes_sent,
            "peer": context.peer(),
        }
        if call.rpc.startswith(AUDITED_PREFIX):
            record = {"caller": "anonymous", "action": call.rpc.rsplit("/", 1)[1]}
            line["audit"] = {**record, **call.audit}
        level = logging.DEBUG if call.rpc.startswith(_QUIET_PREFIXES) else logging.INFO
        request_log.log(level, json.dumps(line, separators=(",", ":")))

    def _model_label(self, name: str) -> str:
        if not name or self.known_model is None or self.known_model(name):
            return name
        return UNKNOWN_MODEL


def start_metrics(port: int, host: str, registry: CollectorRegistry) -> WSGIServer:
    """Serves `registry` on http://host:port/metrics from a daemon thread; port 0 picks one.

    The returned server's `server_port` is the bound port; `shutdown()` stops it.
    """
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def _tag(context: grpc.ServicerContext, request_id: str) -> None:
    """Adds x-request-id to the trailing metadata, keeping what is there.

    `abort_with_status` replaces the trailing metadata with the status' own (which carries
    grpc-status-details-bin), and grpcio sends it only after the handler's exception has
    left this interceptor, so adding here, on the way out, keeps both.
    """
    trailing = tuple(context.trailing_metadata() or ())
    if all(key != REQUEST_ID_KEY for key, _ in trailing):
        context.set_trailing_metadata((*trailing, (REQUEST_ID_KEY, request_id)))


def _failed_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    # abort() sets the code and then raises; any other exception becomes UNKNOWN in grpcio.
    code = context.code()
    return code if code is not None and code != grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN


def _gone_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _watch_requests(call: _Call, requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if not call.model:
            call.model = _model_name(request)
        yield request


def _model_name(request: Any) -> str:
    item = getattr(request, "item", None)  # AnalyzeMany names the model in each item
    if item is not None:
        request = item
    name = getattr(getattr(request, "model", None), "name", "")
    return name if isinstance(name, str) else ""


def _size(response: Any) -> int:
    if isinstance(response, (bytes, bytearray, memoryview)):  # pre-encoded chunk messages
        return len(response)
    byte_size = getattr(response, "ByteSize", None)
    return int(byte_size()) if byte_size is not None else 0


def _shortened(name: str) -> str:
    if len(name) <= _LOGGED_NAME_CHARS:
        return name
    return name[:_LOGGED_NAME_CHARS] + "..."

"""The server process: build the gRPC server, load models, report health, drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import model_service_pb2 as ms

from ..engine.analysis import Engine
from ..engine.batching import Batcher
from ..engine.compute import Compute, default_threads
from ..engine.memory import DEFAULT_BUDGET, MemoryBudget, machine_bytes, parse_budget, text_bytes
from ..models.model import Model
from ..models.registry import Registry
from ..models.repository import MAX_ARCHIVE_BYTES, Repository
from ..models.versions import State
from ..models.zoo import load_builtins
from ..wire import shm
from ..wire.frames import CHUNK_BYTES
from ..wire.requests import Limits
from . import tracing
from .admission import Admission
from .control import ModelServicer
from .handlers import add_service, add_to_server
from .observability import MemoryMetrics, ModelMetrics, Observability, start_metrics
from .security import TokenAuth, server_credentials
from .servicer import GradientServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
CONTROL_SERVICE = ms.DESCRIPTOR.services_by_name["ModelService"]

MODEL_HEALTH_PREFIX = "gradtap.v1.model/"
"""Health reports each model under this prefix and its name: SERVING while its default
version is READY."""

CONNECTION_AGE_MS = 5 * 60 * 1000
"""How long a client connection lives before the server asks the client to reconnect."""


@dataclass(frozen=True)
class Settings:
    """How the server runs; `gradtap serve` fills this from its flags."""

    device: str = "auto"
    model_repository: Path | None = None
    builtins: bool = True
    max_workers: int = 8
    max_request_bytes: int = 64 << 20
    max_tensor_elements: int = 1 << 28
    max_result_bytes: int = 2 << 30
    # OpenTelemetry spans for every call (rpc/tracing.py; the otel extra).
    tracing: bool = False
    grace_seconds: float = 10.0
    # Transport security and authentication (rpc/security.py).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    # Observability (rpc/observability.py): Prometheus metrics on this port when set.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Overload protection (rpc/admission.py) and call duration.
    max_concurrent_requests: int = 16
    max_queue: int = 32
    max_call_seconds: float = 300.0
    # A call whose client reads nothing of its results for this long is ended (rpc/deadline.py).
    stall_seconds: float = 20.0
    # The memory budget every call and model load holds its estimate from (engine/memory.py):
    # bytes ("8GiB") or a share of the machine's memory, or of the GPU's ("50%").
    memory_budget: str = DEFAULT_BUDGET
    # Dynamic batching (engine/batching.py); max_batch_size 1 turns it off.
    max_batch_size: int = 16
    batch_timeout_us: int = 2000
    # The same-host transport (wire/shm.py): off unless asked for.
    shared_memory: bool = False
    # Models that come and go (docs/operations.md, "Managing models"): ModelService, off
    # unless asked for, and only for tokens with @admin unless model_control_insecure.
    model_control: bool = False
    model_control_insecure: bool = False
    max_upload_bytes: int = 1 << 30
    # The most bytes an archive's file may hold, and its members declare unpacked.
    max_archive_bytes: int = MAX_ARCHIVE_BYTES
    # Watch the model repository every this many seconds (None: read it once, at start).
    poll_repository: float | None = None
    # Threads that run the engine's computations (engine/compute.py); None: as many as the
    # device runs well at once (1 on the CPU); 0: each on the thread serving its call.
    compute_threads: int | None = None


def _interceptors(settings: Settings) -> list[grpc.ServerInterceptor]:
    """The interceptor chain, outermost first: trace, observe, authenticate, admit."""
    chain: list[grpc.ServerInterceptor] = []
    if settings.tracing:
        chain.append(tracing.server_interceptor())
    chain.append(Observability())
    if settings.auth_token_file is not None:
        chain.append(TokenAuth.from_file(settings.auth_token_file))
    chain.append(
        Admission(
            settings.max_concurrent_requests,
            settings.max_queue,
            settings.max_call_seconds,
            settings.stall_seconds,
        )
    )
    return chain


def _check_model_control(settings: Settings, interceptors: list[grpc.ServerInterceptor]) -> None:
    """Model control needs tokens, one of them with @admin, unless explicitly insecure."""
    if not settings.model_control:
        return
    if settings.max_upload_bytes < 1:
        raise ValueError("--max-upload-bytes must be at least 1")
    auth = next((i for i in interceptors if isinstance(i, TokenAuth)), None)
    if auth is None and not settings.model_control_insecure:
        raise ValueError(
            "--model-control lets callers load and unload models: it needs --auth-token-file "
            "with a token holding @admin (or, on a trusted host only, --model-control-insecure)"
        )
    if auth is not None and not auth.has_admin:
        raise ValueError(
            "--model-control: no token in --auth-token-file holds @admin, so every model "
            "control call would be refused; add @admin to an operator's token"
        )


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS) credentials from the settings; None for plaintext."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("--tls-cert and --tls-key must be given together")
    if settings.tls_cert is None or settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    return server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


def memory_budget(text: str, device: torch.device) -> int:
    """`--memory-budget` in bytes on `device`: bytes, or a share of its memory."""
    return parse_budget(text, machine_bytes(device))


def resolve_device(name: str) -> torch.device:
    """ "auto" means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu or cuda")
    return device


@dataclass
class Running:
    """A started server and the handles needed to stop it well."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    registry: Registry
    metrics_port: int | None = None
    metrics_server: WSGIServer | None = None
    batcher: Batcher | None = None
    servicer: GradientServicer | None = None
    admission: Admission | None = None
    repository: Repository | None = None
    compute: Compute | None = None
    budget: MemoryBudget | None = None

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def model_changed(self, name: str) -> None:
        """Reports a model's readiness under its own health service name."""
        status = self.registry.status(name)
        serving = status is not None and status.state is State.READY
        self.health.set(
            MODEL_HEALTH_PREFIX + name,
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    def drain(self, grace: float) -> None:
        """Turns health NOT_SERVING, refuses new calls and lets in-flight ones finish."""
        self.set_serving(False)
        self.health.enter_graceful_shutdown()  # every model's service too, for good
        if self.repository is not None:
            self.repository.stop()
        self.server.stop(grace).wait()
        if self.servicer is not None:
            self.servicer.close()
        if self.compute is not None:
            self.compute.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


def start(
    address: str = "127.0.0.1:0",
    settings: Settings | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> Running:
    """Starts a server on `address` (port 0 picks a free port), then loads the models.

    Health answers NOT_SERVING until every model has loaded, then SERVING.
    """
    settings = settings or Settings()
    device = resolve_device(settings.device)
    if settings.shared_memory and not shm.DIRECTORY.is_dir():
        raise ValueError(f"--shared-memory needs {shm.DIRECTORY} (a Linux host)")
    if settings.poll_repository is not None and settings.model_repository is None:
        raise ValueError("--poll-repository needs --model-repository")
    budget = MemoryBudget(
        memory_budget(settings.memory_budget, device), settings.max_concurrent_requests
    )
    registry = Registry(device, reserve=budget.reserve)
    wanted = settings.compute_threads
    compute = Compute(default_threads(device) if wanted is None else wanted)
    engine = Engine(device, compute)
    interceptors = _interceptors(settings)
    _check_model_control(settings, interceptors)
    observability = next(i for i in interceptors if isinstance(i, Observability))
    observability.known_model = lambda name: registry.status(name) is not None
    observability.registry.register(ModelMetrics(registry))
    observability.registry.register(MemoryMetrics(budget))
    # Admitted calls wait for a place on a server thread: they get threads of their own,
    # and max_workers stay free for health, ListModels and DescribeModel. grpcio refuses
    # calls past the pool (RESOURCE_EXHAUSTED) instead of queueing them without bound.
    threads = settings.max_workers + settings.max_concurrent_requests + settings.max_queue
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradtap"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=threads,
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            # Result messages carry at most 1 MiB of tensor bytes plus their headers.
            ("grpc.max_send_message_length", 4 * CHUNK_BYTES),
            ("grpc.so_reuseport", 0),
            # Clients reconnect every few minutes, and re-resolve their target as they do:
            # replicas added since (a scaled-up Deployment) then get their share of calls.
            # Calls in flight may run to their maximum duration on the old connection.
            ("grpc.max_connection_age_ms", CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", round(settings.max_call_seconds * 1e3)),
        ],
    )
    batcher = Batcher(
        engine,
        max_batch_size=settings.max_batch_size,
        timeout_us=settings.batch_timeout_us,
        observe=observability.observe_batch,
    )

    def retired(model: Model) -> None:  # its last call ended: what was kept for it goes
        engine.forget(model)
        batcher.forget(model)

    registry.on_retired = retired
    repository = (
        Repository(registry, settings.model_repository, settings.max_archive_bytes)
        if settings.model_repository is not None
        else None
    )
    servicer = GradientServicer(
        registry,
        engine,
        Limits(
            max_tensor_elements=settings.max_tensor_elements,
            max_result_bytes=settings.max_result_bytes,
            shared_memory=settings.shared_memory,
        ),
        batcher,
        budget,
    )
    add_to_server(servicer, server)
    services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if settings.model_control:
        control = ModelServicer(
            registry, repository, settings.max_upload_bytes, settings.max_archive_bytes
        )
        add_service(control, server, CONTROL_SERVICE)
        services.append(CONTROL_SERVICE.full_name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(services, server)
    credentials = credentials or _credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    running = Running(
        server=server,
        port=port,
        health=health_servicer,
        registry=registry,
        batcher=batcher,
        servicer=servicer,
        admission=next(i for i in interceptors if isinstance(i, Admission)),
        repository=repository,
        compute=compute,
        budget=budget,
    )
    registry.on_change = running.model_changed
    if settings.metrics_port is not None:
        running.metrics_server = start_metrics(
            settings.metrics_port, settings.metrics_host, observability.registry
        )
        running.metrics_port = running.metrics_server.server_port
    running.set_serving(False)
    server.start()
    try:
        if settings.builtins:
            load_builtins(registry)
        if repository is not None:
            refused = repository.load_all()
            if refused:
                log.error("refused %d model archive(s): %s", len(refused), ", ".join(refused))
            if settings.poll_repository is not None:
                repository.watch(settings.poll_repository)
    except BaseException:
        server.stop(None)
        raise
    running.set_serving(True)
    log.info(
        "serving %d model(s) on port %d (%s), memory budget %s",
        len(registry),
        port,
        device,
        text_bytes(budget.total),
    )
    return running


def create_server(
    address: str = "127.0.0.1:0", settings: Settings | None = None
) -> tuple[grpc.Server, int]:
    """A started, SERVING server and its port: the testable factory."""
    running = start(address, settings)
    return running.server, running.port


def serve(address: str, settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains within the grace period and returns."""
    running = start(address, settings)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: draining for up to %.0f s", signum, settings.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"gradtap serving {len(running.registry)} model(s) on {address.rsplit(':', 1)[0]}:"
        f"{running.port}",
        flush=True,
    )
    # Poll rather than block: the kernel may deliver SIGTERM to any thread, and then nothing
    # interrupts a main thread blocked on a lock, so its Python handler would never run.
    while not stopping.wait(0.2):
        pass
    running.drain(settings.grace_seconds)

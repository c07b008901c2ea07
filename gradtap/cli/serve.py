"""`gradtap serve`: run the server (needs the server extra, with torch), imported only here
and only when the command runs, so that the other commands never load torch."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .options import usage

SPIN_COUNT = "30000"
"""GOMP_SPINCOUNT for the server unless set: how long an idle OpenMP thread spins before it
sleeps. libgomp's default (300,000) kept the compute thread's idle partner spinning 4-9 ms of
CPU after every computation, measured from /proc/<pid>/task/*/schedstat; 30,000 keeps it
under about 1.5 ms, still far longer than the gaps between the regions of one computation."""


class Device(str, Enum):
    """Where the server runs its models."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _file_option(help: str) -> Any:
    """An option naming an existing, readable file."""
    return typer.Option(exists=True, dir_okay=False, readable=True, metavar="FILE", help=help)


def serve(
    host: Annotated[
        str,
        typer.Option(metavar="HOST", help="Interface to listen on; 0.0.0.0 for every IPv4 one."),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, metavar="PORT", help="Port to listen on; 0 picks a free one."
        ),
    ] = 50051,
    device: Annotated[
        Device, typer.Option(help="Where models run; auto picks CUDA when torch sees it.")
    ] = Device.auto,
    model_repository: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            dir_okay=True,
            readable=True,
            metavar="DIR",
            help="A directory of exported models (NAME.pt2, from torch.export.save) to serve.",
        ),
    ] = None,
    no_builtins: Annotated[
        bool,
        typer.Option(
            "--no-builtins",
            help="Do not load the built-in seed models (seed-encoder, seed-convnet, seed-mlp).",
        ),
    ] = False,
    max_workers: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Threads for the calls outside admission (health, ListModels, DescribeModel); "
            "admitted calls get max-concurrent-requests + max-queue threads more.",
        ),
    ] = 8,
    grace: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="How long calls in flight may finish after SIGTERM or Ctrl-C.",
        ),
    ] = 10.0,
    max_concurrent_requests: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Analyze, AnalyzeMany, Attribute and Perturb calls that run at once; keep it "
            "at least --max-batch-size, or batches cannot fill.",
        ),
    ] = 16,
    compute_threads: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="N",
            help="Threads that run the computations, one computation each at a time (default: "
            "1 on the CPU, whose cores torch's own threads use; 2 on a GPU); 0 runs each on "
            "the thread serving its call.",
        ),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="Calls that may wait for a place; past it calls fail with RESOURCE_EXHAUSTED "
            "and a retry delay.",
        ),
    ] = 32,
    max_call_seconds: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="The longest a call may take from its arrival, whatever the client's deadline.",
        ),
    ] = 300.0,
    stall_seconds: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="End a call whose client has read nothing of its results for this long, so "
            "that its place and memory go to other callers (DEADLINE_EXCEEDED, READER_STALLED).",
        ),
    ] = 20.0,
    tls_cert: Annotated[
        Path | None,
        _file_option("PEM certificate chain: serve TLS (with --tls-key)."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        _file_option("PEM private key of --tls-cert."),
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        _file_option("PEM CA bundle: require client certificates it signed (mutual TLS)."),
    ] = None,
    auth_token_file: Annotated[
        Path | None,
        _file_option("Require a bearer token from this file on every call (docs/operations.md)."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics.",
        ),
    ] = None,
    max_batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Rows that concurrent compatible Analyze calls may share in one pass; "
            "1 turns dynamic batching off.",
        ),
    ] = 16,
    batch_timeout_us: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="MICROSECONDS",
            help="How long the first call of a batch waits for companions (only while calls "
            "overlap; a lone call never waits).",
        ),
    ] = 2000,
    memory_budget: Annotated[
        str,
        typer.Option(
            metavar="BYTES|PERCENT",
            help="Working memory all calls and model loads share: bytes (8GiB, 512MiB, 2GB) "
            "or a share of the machine's memory, or the GPU's on CUDA (50%). A call waits "
            "for its estimate to fit; one that never could is refused (docs/memory.md).",
        ),
    ] = "50%",
    max_result_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="BYTES",
            help="Refuse, before any work, a call whose result would be larger.",
        ),
    ] = 2 << 30,
    shared_memory: Annotated[
        bool,
        typer.Option(
            "--shared-memory",
            help="Let callers on this host have Analyze results written into shared memory "
            "they created, instead of streamed (docs/shared-memory.md).",
        ),
    ] = False,
    poll_repository: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            metavar="SECONDS",
            help="Look at --model-repository this often and load archives added or changed, "
            "unload those removed; a version keeps serving until its replacement is READY.",
        ),
    ] = None,
    model_control: Annotated[
        bool,
        typer.Option(
            "--model-control",
            help="Serve gradtap.v1.ModelService: load (also by upload), unload and pin model "
            "versions at run time, for tokens holding @admin in --auth-token-file.",
        ),
    ] = False,
    model_control_insecure: Annotated[
        bool,
        typer.Option(
            "--model-control-insecure",
            help="Allow --model-control without --auth-token-file: anyone who reaches the "
            "port may load and unload models. Only on a trusted host.",
        ),
    ] = False,
    max_upload_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="BYTES",
            help="The largest archive a LoadModel upload may carry; it is held in memory.",
        ),
    ] = 1 << 30,
    max_archive_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="BYTES",
            help="Refuse a model archive whose file is larger, or whose members would unpack "
            "to more, before reading it (the model shows FAILED; the others are served).",
        ),
    ] = 8 << 30,
    otel: Annotated[
        bool,
        typer.Option(
            "--otel",
            help="Trace every call with OpenTelemetry (needs the otel extra; configure the "
            "exporter the OpenTelemetry way, e.g. with opentelemetry-instrument).",
        ),
    ] = False,
) -> None:
    """Run the server (needs the server extra, with torch).

    Serves the built-in seed models and any exported models in --model-repository until
    SIGTERM or Ctrl-C, then drains the calls in flight within --grace seconds. With
    --poll-repository or --model-control, models come and go while it runs.
    """
    # read by libgomp when torch loads, just below
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    try:
        if TYPE_CHECKING:
            from server.rpc import app as server
        else:
            from gradtap.server.rpc import app as server
    except ImportError as e:
        typer.echo('gradtap serve needs the server extra: pip install "gradtap[server]"', err=True)
        typer.echo(f"  ({e})", err=True)
        raise typer.Exit(2) from None
    if no_builtins and model_repository is None and not model_control:
        usage("without the built-in models, name a --model-repository to serve", "--no-builtins")
    if poll_repository is not None and model_repository is None:
        usage("there is nothing to poll: name a --model-repository", "--poll-repository")
    if model_control_insecure and not model_control:
        usage("it only makes sense with --model-control", "--model-control-insecure")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        server.memory_budget(memory_budget, server.resolve_device(device.value))
        if not max_call_seconds > 0:
            raise ValueError("--max-call-seconds must be more than 0")
        if not stall_seconds > 0:
            raise ValueError("--stall-seconds must be more than 0")
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    settings = server.Settings(
        device=device.value,
        model_repository=model_repository,
        builtins=not no_builtins,
        max_workers=max_workers,
        grace_seconds=grace,
        max_concurrent_requests=max_concurrent_requests,
        max_queue=max_queue,
        max_call_seconds=max_call_seconds,
        stall_seconds=stall_seconds,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_token_file=auth_token_file,
        metrics_port=metrics_port,
        max_batch_size=max_batch_size,
        batch_timeout_us=batch_timeout_us,
        max_result_bytes=max_result_bytes,
        memory_budget=memory_budget,
        shared_memory=shared_memory,
        tracing=otel,
        model_control=model_control,
        model_control_insecure=model_control_insecure,
        max_upload_bytes=max_upload_bytes,
        max_archive_bytes=max_archive_bytes,
        poll_repository=poll_repository,
        compute_threads=compute_threads,
    )
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        server.serve(f"{bracketed}:{port}", settings)
    except (OSError, RuntimeError) as e:  # grpc raises RuntimeError when the port is taken
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except ValueError as e:  # a malformed token file, TLS flags that do not go together
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None

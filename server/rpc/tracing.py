"""Optional OpenTelemetry tracing: one span per RPC, via opentelemetry-instrumentation-grpc.

Spans go to the process's tracer provider: configure exporters the OpenTelemetry way,
e.g. `opentelemetry-instrument --traces_exporter otlp gradtap serve --otel`, or by setting
a provider before calling gradtap.server.start().
"""

from __future__ import annotations

import grpc


def server_interceptor() -> grpc.ServerInterceptor:
    """OpenTelemetry's gRPC server interceptor; ValueError when the extra is missing."""
    try:
        from opentelemetry.instrumentation.grpc import server_interceptor as otel_interceptor
    except ImportError as e:
        raise ValueError('tracing needs the otel extra: pip install "gradtap[otel]"') from e
    return otel_interceptor()  # type: ignore[no-untyped-call, no-any-return]

"""RPC method handlers: registering the service, and rebuilding a handler around new behaviour.

The interceptors (admission, observability, security) wrap a handler's function and need a
handler of the same kind back; `behaviour_of` and `same_kind` do that for every kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ..wire.frames import serialize
from .status import lenient

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
"""A handler's function: a request (or an iterator of them) and the context in."""

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
"""(request streaming, response streaming) -> grpc's factory for that kind of handler."""


def behaviour_of(handler: grpc.RpcMethodHandler) -> Behaviour:
    """The function a handler runs, whatever its kind."""
    behaviour: Behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    return behaviour


def same_kind(handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> grpc.RpcMethodHandler:
    """A handler like `handler` (same streaming kind and serializers) running `behaviour`."""
    make = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    made: grpc.RpcMethodHandler = make(
        behaviour, handler.request_deserializer, handler.response_serializer
    )
    return made


def add_to_server(servicer: pb_grpc.GradientServiceServicer, server: grpc.Server) -> None:
    """Registers every RPC of GradientService, built from the service descriptor.

    Unlike the generated add_GradientServiceServicer_to_server, responses may also be
    pre-encoded bytes (see wire/frames.py, encode_chunk), which spares a copy of every
    tensor chunk; and requests that do not parse reach the servicer (see status.lenient).
    """
    add_service(servicer, server, pb.DESCRIPTOR.services_by_name["GradientService"])


def add_service(servicer: Any, server: grpc.Server, service: ServiceDescriptor) -> None:
    """Registers every RPC of `service` on `servicer`'s methods of the same names, with
    lenient request parsing and pre-encoded responses allowed (see add_to_server)."""
    handlers = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=lenient(request_type),
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)

"""The channel both faces open: message limits, load balancing, retries, TLS and the token."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.experimental

from ._exchange import Method
from ._retry import DEFAULT_RETRIES, check_retries, method_config

MAX_SEND_BYTES = 64 << 20
"""Largest request the client sends (inputs travel in one message); the server's default."""

MAX_RECEIVE_BYTES = 16 << 20
"""Largest response message accepted; results arrive in chunks of at most 1 MiB."""

DEFAULT_ADDRESS = "127.0.0.1:50051"


def channel_options(
    extra: Sequence[tuple[str, Any]] = (), retries: int = DEFAULT_RETRIES
) -> list[tuple[str, Any]]:
    """Message limits set explicitly on both sides, round-robin over several backends, and
    up to `retries` retries of UNAVAILABLE and RESOURCE_EXHAUSTED (see _retry.py)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    methods = method_config(retries)
    if methods:
        config["methodConfig"] = methods
    return [
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.service_config", json.dumps(config)),
        # Also with retries=0: gRPC then still retries, transparently, calls that never
        # reached a server (e.g. sent as a draining server closed the connection).
        ("grpc.enable_retries", 1),
        # gRPC keeps a call's request messages for retries up to this size (256 KiB by
        # default); past it the call is not retried. Inputs may be this large.
        ("grpc.per_rpc_retry_buffer_size", MAX_SEND_BYTES),
        # Drive server-streaming calls on the caller's thread instead of a thread spawned
        # per call: saves about 0.3 ms on every small call.
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        *extra,
    ]


def credentials(
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any certificate material is given, else None (plaintext)."""
    if root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class Connection:
    """What the sync and asyncio clients share: a channel and the settings of every call."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        options: Sequence[tuple[str, Any]] = (),
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        """Opens a channel to a gradtap server (lazily: nothing connects before a call).

        Args:
            address: "host:port", or any gRPC target such as
                "ipv4:10.0.0.1:50051,10.0.0.2:50051" or "dns:///gradtap.svc:50051"; calls
                are balanced round-robin across backends.
            timeout: default deadline in seconds for every call; None waits forever. Every
                call also takes its own `timeout=`.
            token: bearer token sent with every call.
            root_certificates, private_key, certificate_chain: PEM bytes for TLS (and
                mutual TLS).
            options: extra gRPC channel options.
            retries: how many times to retry a call that failed with UNAVAILABLE (a
                replica down or draining) or RESOURCE_EXHAUSTED (a server at capacity), 0
                to 4; 0 turns retries off. gRPC waits between attempts with exponential
                backoff, or as long as the server asks, and retries only until a response
                arrives; analyze() also sends its call once more when the stream broke off
                with UNAVAILABLE (a replica died mid-stream). A partial result is never
                returned.
        """
        tls = credentials(root_certificates, private_key, certificate_chain)
        self._channel = self._open(address, tls, channel_options(options, retries))
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._retries = check_retries(retries)
        self._region_sizes: dict[str, int] = {}
        self._callables: dict[Method, Any] = {}

    def _open(
        self, address: str, tls: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        """The face's channel: grpc's or grpc.aio's."""
        raise NotImplementedError

    def _invoke(self, method: Method, request: Any, timeout: float | None) -> Any:
        """Starts a call of `method`; the face iterates or awaits what it returns."""
        callable_ = self._callables.get(method)
        if callable_ is None:
            make = getattr(self._channel, method.kind)
            callable_ = self._callables[method] = make(
                method.path,
                request_serializer=method.serialize,
                response_deserializer=method.deserialize,
            )
        deadline = self._timeout if timeout is None else timeout
        if request is not None and method.kind.startswith("stream"):
            request = iter(request)  # a fresh stream of request messages for each attempt
        arguments = () if request is None else (request,)
        return callable_(*arguments, timeout=deadline, metadata=self._metadata)

"""The synchronous client."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ._errors import from_rpc_error
from ._objective import Objective
from ._request import (
    DEFAULT_ADDRESS,
    analyze_request,
    call_metadata,
    channel_options,
    credentials,
    model_ref,
)
from ._result import (
    Assembler,
    ModelDescription,
    ModelInfo,
    Result,
    decode_response,
    description,
    model_info,
)


class Client:
    """A connection to a gradtap server.

    Args:
        address: "host:port", or any gRPC target such as "ipv4:10.0.0.1:50051,10.0.0.2:50051"
            or "dns:///gradtap.svc:50051"; calls are balanced round-robin across backends.
        timeout: default deadline in seconds for every call; None waits forever.
        token: bearer token sent with every call.
        root_certificates, private_key, certificate_chain: PEM bytes for TLS (and mutual TLS).
        options: extra gRPC channel options.
    """

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
    ) -> None:
        tls = credentials(root_certificates, private_key, certificate_chain)
        opts = channel_options(options)
        self._channel = (
            grpc.secure_channel(address, tls, opts) if tls else grpc.insecure_channel(address, opts)
        )
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._analyze = self._channel.unary_stream(
            "/gradtap.v1.GradientService/Analyze",
            request_serializer=pb.AnalyzeRequest.SerializeToString,
            response_deserializer=decode_response,
        )
        self._timeout = timeout
        self._metadata = call_metadata(token)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The served models, sorted by name.

        Raises:
            GradtapError: the call failed; `.code` says how.
        """
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return [model_info(m) for m in response.models]

    def describe(
        self, model: str, *, digest: str | None = None, timeout: float | None = None
    ) -> ModelDescription:
        """A model's inputs, outputs, targetable nodes, module paths and parameters.

        Raises:
            GradtapError: NOT_FOUND for an unknown model, or another failure.
        """
        request = pb.DescribeModelRequest(model=model_ref(model, digest))
        try:
            response = self._stub.DescribeModel(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return description(response)

    def analyze(
        self,
        model: str,
        inputs: Any,
        targets: Sequence[str] = (),
        objective: Objective | None = None,
        *,
        input_grad: bool = False,
        activations: bool = False,
        outputs: bool = True,
        digest: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Runs one forward and backward pass on the server.

        Args:
            model: the model's name.
            inputs: one array, or a list of arrays for a model with several inputs.
            targets: graph-node names or module paths whose gradients (and activations) to
                return; results are keyed by these strings exactly.
            objective: the scalar to differentiate; required for gradients.
            input_grad: also return the gradient with respect to each float input.
            activations: also return each target's activation.
            outputs: also return the model's outputs.
            digest: fail unless the served model has this digest.
            timeout: deadline in seconds for this call.

        Returns:
            A complete Result; a stream cut short raises instead.

        Raises:
            GradtapError: INVALID_ARGUMENT (naming the field), NOT_FOUND, UNAVAILABLE, ...
        """
        request = analyze_request(
            model,
            inputs,
            targets,
            objective,
            input_grad=input_grad,
            activations=activations,
            outputs=outputs,
            digest=digest,
        )
        assembler = Assembler(model)
        try:
            for message in self._analyze(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            ):
                assembler.feed(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return assembler.result()

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health: "SERVING", "NOT_SERVING", ...

        Raises:
            GradtapError: the server could not be reached.
        """
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

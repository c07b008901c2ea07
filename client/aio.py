"""The asyncio client: the same API as gradtap.client.Client, with awaitable calls."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ._errors import GradtapError, from_rpc_error
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

__all__ = ["Client", "GradtapError", "Objective", "Result"]


class Client:
    """An asyncio connection to a gradtap server; see gradtap.client.Client for the arguments."""

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
            grpc.aio.secure_channel(address, tls, opts)
            if tls
            else grpc.aio.insecure_channel(address, opts)
        )
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._analyze = self._channel.unary_stream(
            "/gradtap.v1.GradientService/Analyze",
            request_serializer=pb.AnalyzeRequest.SerializeToString,
            response_deserializer=decode_response,
        )
        self._timeout = timeout
        self._metadata = call_metadata(token)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The served models, sorted by name."""
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return [model_info(m) for m in response.models]

    async def describe(
        self, model: str, *, digest: str | None = None, timeout: float | None = None
    ) -> ModelDescription:
        """A model's inputs, outputs, targetable nodes, module paths and parameters."""
        request = pb.DescribeModelRequest(model=model_ref(model, digest))
        try:
            response = await self._stub.DescribeModel(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return description(response)

    async def analyze(
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
        """Runs one forward and backward pass; see gradtap.client.Client.analyze."""
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
            call = self._analyze(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
            async for message in call:
                assembler.feed(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return assembler.result()

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health: "SERVING", "NOT_SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

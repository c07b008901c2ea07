"""The asyncio client: the same API as gradtap.client.Client, with awaitable calls."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ._attribute import AttributionAssembler, attribute_request
from ._errors import GradtapError, from_rpc_error
from ._many import (
    AsyncResultStream,
    ManyAssembler,
    ObjectiveFor,
    decode_many_response,
    many_options,
    many_requests,
)
from ._objective import Objective
from ._perturb import OnStep, PerturbAssembler, PerturbResult, perturb_request
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
from ._retry import DEFAULT_RETRIES, Resend
from ._shm import Regions, SharedRegion
from ._target import Targets, as_float32, as_targets

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
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        tls = credentials(root_certificates, private_key, certificate_chain)
        opts = channel_options(options, retries)
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
        self._analyze_many = self._channel.stream_stream(
            "/gradtap.v1.GradientService/AnalyzeMany",
            request_serializer=pb.AnalyzeManyRequest.SerializeToString,
            response_deserializer=decode_many_response,
        )
        self._timeout = timeout
        self._metadata = call_metadata(token)
        self._retries = retries
        self._region_sizes: dict[str, int] = {}

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
        targets: Targets = (),
        objective: Objective | None = None,
        *,
        input_grad: bool = False,
        activations: bool = False,
        outputs: bool = True,
        param_grads: Sequence[str] = (),
        digest: str | None = None,
        precision: str = "full",
        shared_memory: bool | SharedRegion = False,
        timeout: float | None = None,
    ) -> Result:
        """Runs one forward and backward pass; see gradtap.client.Client.analyze."""
        targets = as_targets(targets)
        request = analyze_request(
            model,
            inputs,
            targets,
            objective,
            input_grad=input_grad,
            activations=activations,
            outputs=outputs,
            digest=digest,
            precision=precision,
            param_grads=param_grads,
        )
        resend = Resend(self._retries)
        regions = Regions(shared_memory, self._region_sizes, model)
        try:
            while True:
                assembler = Assembler(model, regions.open(request))
                try:
                    call = self._analyze(
                        request, timeout=self._deadline(timeout), metadata=self._metadata
                    )
                    async for message in resend.watch_async(call):
                        assembler.feed(message)
                except grpc.RpcError as e:
                    if resend.again(e):
                        continue
                    error = from_rpc_error(e)
                    if regions.grow(error):
                        continue
                    raise error from None
                return as_float32(assembler.result(), targets)
        finally:
            regions.close()

    def analyze_many(
        self,
        model: str,
        batches: Iterable[Any],
        targets: Targets = (),
        objective: ObjectiveFor = None,
        *,
        input_grad: bool = False,
        activations: bool = False,
        outputs: bool = True,
        param_grads: Sequence[str] = (),
        aggregate: bool = False,
        per_item: bool = True,
        max_in_flight: int = 4,
        digest: str | None = None,
        precision: str = "full",
        timeout: float | None = None,
    ) -> AsyncResultStream:
        """Analyzes many inputs over one stream; see gradtap.client.Client.analyze_many.

        Returns an AsyncResultStream: `async for r in client.analyze_many(...)`; its
        `.aggregate` is set once the last result was taken.
        """
        targets = as_targets(targets)
        options, flags = many_options(
            aggregate, per_item, max_in_flight, input_grad, activations, outputs, param_grads
        )
        requests = many_requests(
            model, batches, targets, objective, options, digest=digest, precision=precision, **flags
        )

        def start() -> Any:
            return self._analyze_many(timeout=self._deadline(timeout), metadata=self._metadata)

        assembler = ManyAssembler(model, targets)
        return AsyncResultStream(start, requests, assembler, max_in_flight, aggregate)

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

    async def attribute(
        self,
        model: str,
        inputs: Any,
        method: str,
        /,
        target: Any = None,
        layer: str | None = None,
        *,
        output: int = 0,
        digest: str | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> np.ndarray:
        """Attributes an output to the input or a layer; see gradtap.client.Client.attribute."""
        request = attribute_request(
            model, inputs, method, target, layer, output=output, digest=digest, params=params
        )
        assembler = AttributionAssembler()
        try:
            call = self._stub.Attribute(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
            async for message in call:
                assembler.feed(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return assembler.result()

    async def perturb(
        self,
        model: str,
        inputs: Any,
        method: str = "fgsm",
        objective: Objective | None = None,
        *,
        epsilon: float,
        step_size: float | None = None,
        steps: int | None = None,
        norm: str = "Linf",
        targeted: bool = False,
        clamp: tuple[float | None, float | None] | None = None,
        random_start: bool = False,
        seed: int | None = None,
        mask: Any = None,
        zero_threshold: float | None = None,
        on_step: OnStep | None = None,
        digest: str | None = None,
        timeout: float | None = None,
    ) -> PerturbResult:
        """Runs an adversarial loop; see gradtap.client.Client.perturb. `on_step` may be a
        coroutine function."""
        request = perturb_request(
            model,
            inputs,
            method,
            objective,
            epsilon=epsilon,
            step_size=step_size,
            steps=steps,
            norm=norm,
            targeted=targeted,
            clamp=clamp,
            random_start=random_start,
            seed=seed,
            mask=mask,
            zero_threshold=zero_threshold,
            digest=digest,
        )
        assembler = PerturbAssembler(model)
        call = self._stub.Perturb(request, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            async for message in call:
                step = assembler.feed(message)
                if step is not None and on_step is not None:
                    reply = on_step(*step)
                    if inspect.isawaitable(reply):
                        await reply
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops the loop if on_step raised
        return assembler.result()

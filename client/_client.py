"""The synchronous client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ._attribute import AttributionAssembler, attribute_request
from ._errors import from_rpc_error
from ._many import (
    ManyAssembler,
    ObjectiveFor,
    ResultStream,
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


class Client:
    """A connection to a gradtap server.

    Args:
        address: "host:port", or any gRPC target such as "ipv4:10.0.0.1:50051,10.0.0.2:50051"
            or "dns:///gradtap.svc:50051"; calls are balanced round-robin across backends.
        timeout: default deadline in seconds for every call; None waits forever.
        token: bearer token sent with every call.
        root_certificates, private_key, certificate_chain: PEM bytes for TLS (and mutual TLS).
        options: extra gRPC channel options.
        retries: how many times to retry a call that failed with UNAVAILABLE (a replica
            down or draining) or RESOURCE_EXHAUSTED (a server at capacity), 0 to 4; 0
            turns retries off. gRPC waits between attempts with exponential backoff, or as
            long as the server asks, and retries only until a response arrives; analyze()
            also sends its call once more when the stream broke off with UNAVAILABLE (a
            replica died mid-stream). A partial result is never returned.
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
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        tls = credentials(root_certificates, private_key, certificate_chain)
        opts = channel_options(options, retries)
        self._channel = (
            grpc.secure_channel(address, tls, opts) if tls else grpc.insecure_channel(address, opts)
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
        """Runs one forward and backward pass on the server.

        Args:
            model: the model's name.
            inputs: one array, or a list of arrays for a model with several inputs.
            targets: graph-node names or module paths whose gradients (and activations) to
                return, or Target(name, reduce=..., dims=..., topk=..., dtype=...) to have
                them reduced on the server first; results are keyed by the names exactly.
            objective: the scalar to differentiate; required for gradients.
            input_grad: also return the gradient with respect to each float input.
            activations: also return each target's activation.
            outputs: also return the model's outputs.
            param_grads: state-dict names of parameters (describe() lists them), or "*" for
                all, whose gradients to return in Result.param_grads.
            digest: fail unless the served model has this digest.
            precision: "full", or "bfloat16" to run the forward pass under bf16 autocast
                (faster on GPUs; results carry about 3 significant digits).
            shared_memory: on the server's host, with a server started with
                --shared-memory: True to have the result written into a shared-memory
                region made for this call, or a SharedRegion to reuse (fastest; the arrays
                are then views of it, valid until its next use). See docs/shared-memory.md.
            timeout: deadline in seconds for this call.

        Returns:
            A complete Result; a stream cut short raises instead.

        Raises:
            GradtapError: INVALID_ARGUMENT (naming the field), NOT_FOUND, UNAVAILABLE, ...
        """
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
                    for message in resend.watch(call):
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
    ) -> ResultStream:
        """Analyzes many inputs over one stream; yields one Result per item, in order.

        Items are read from `batches` and sent only as results come back, at most
        `max_in_flight` ahead, so a large dataset never sits in memory at once.

        Args:
            model: the model's name; the same for every item.
            batches: an iterable of inputs: each an array (a batch for the model), or a
                tuple of arrays for a model with several inputs.
            targets, input_grad, activations, outputs, param_grads, digest, precision: as
                for analyze(), the same for every item.
            objective: an Objective for every item, or a function of the item's position
                returning that item's Objective (e.g. its labels).
            aggregate: keep a running aggregate of every target's gradient on the server
                (mean gradient, mean |gradient| per channel); it arrives at the end in
                the returned stream's `.aggregate`. Targets must then have no reduction.
            per_item: send each item's tensors. With per_item=False (needs aggregate) the
                results carry only the loss and metadata: iterate them for progress.
            max_in_flight: items sent ahead of the results received.
            timeout: deadline in seconds for the whole stream.

        Returns:
            A ResultStream: iterate it for the results; the stream starts on the first
            next() and breaking out of the loop cancels it.

        Raises:
            GradtapError: while iterating. A failed item ends the stream: its error names
                the item in the field (items[K].inputs[0].shape) and the results before
                it have been yielded.
            ValueError: for arguments that cannot work, while iterating for bad items.
        """
        targets = as_targets(targets)
        options, flags = many_options(
            aggregate, per_item, max_in_flight, input_grad, activations, outputs, param_grads
        )
        requests = many_requests(
            model, batches, targets, objective, options, digest=digest, precision=precision, **flags
        )

        def start(outgoing: Iterator[pb.AnalyzeManyRequest]) -> Any:
            return self._analyze_many(
                outgoing, timeout=self._deadline(timeout), metadata=self._metadata
            )

        assembler = ManyAssembler(model, targets)
        return ResultStream(start, requests, assembler, max_in_flight, aggregate)

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

    def attribute(
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
        """Attributes a model output to its input, or to a layer, with a Captum method.

        Args:
            model: the model's name.
            inputs: one array, or a list of arrays for a model with several inputs; the
                one floating-point input is attributed, the others are held fixed.
            method: saliency, input_x_gradient, integrated_gradients, smoothgrad,
                guided_backprop, layer_gradient_x_activation, layer_grad_cam,
                layer_integrated_gradients or layer_conductance. Positional only, so that
                `method=` stays free for Captum's integration rule.
            target: the class to attribute, as in Captum: one index for every row, or one
                per row; None when the output has one value per row.
            layer: for layer methods, a graph-node name or module path.
            output: which output, for models that return several.
            digest: fail unless the served model has this digest.
            timeout: deadline in seconds for this call.
            **params: the method's parameters, with Captum's names and defaults: n_steps,
                method, baselines, internal_batch_size (integrated gradients, layer IG,
                conductance), nt_samples, nt_samples_batch_size, stdevs, seed (smoothgrad),
                abs (saliency, smoothgrad), relu_attributions, attr_dim_summation (Grad-CAM),
                multiply_by_inputs.

        Returns:
            The attribution: shaped like the input, or like the layer for layer methods.

        Raises:
            GradtapError: INVALID_ARGUMENT naming the field (params.n_steps, layer, ...),
                NOT_FOUND, UNAVAILABLE, ...
            TypeError, ValueError: a parameter the client cannot encode.
        """
        request = attribute_request(
            model, inputs, method, target, layer, output=output, digest=digest, params=params
        )
        assembler = AttributionAssembler()
        try:
            for message in self._stub.Attribute(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            ):
                assembler.feed(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return assembler.result()

    def perturb(
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
        """Runs an adversarial loop on the server, with Captum's FGSM and PGD semantics.

        Args:
            model: the model's name.
            inputs: one array, or a list of arrays; the one floating-point input is
                perturbed, the others are held fixed.
            method: "fgsm" (one step of size epsilon) or "pgd".
            objective: the loss to follow; it may sit on an intermediate node.
            epsilon: FGSM's step size; PGD's radius around the input.
            step_size: PGD's step size.
            steps: PGD's number of steps (at most 1000).
            norm: PGD's ball: "Linf" or "L2".
            targeted: False ascends the objective (an untargeted attack maximizes the
                loss); True descends it.
            clamp: (low, high) bounds of the input's values; either may be None.
            random_start: PGD starts from a uniform random point of the ball.
            seed: seed of the random start, for a reproducible one.
            mask: 0/1 array shaped like the input: which elements may move.
            zero_threshold: gradient elements at or below it do not move; Captum's 1e-6
                by default.
            on_step: called with (step, loss) as each step finishes on the server.
            digest: fail unless the served model has this digest.
            timeout: deadline in seconds for this call.

        Returns:
            A PerturbResult: adversarial, losses, objective_before, objective_after.

        Raises:
            GradtapError: INVALID_ARGUMENT naming the field (epsilon, steps, objective...),
                NOT_FOUND, UNAVAILABLE, ...
        """
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
            for message in call:
                step = assembler.feed(message)
                if step is not None and on_step is not None:
                    on_step(*step)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops the loop if on_step raised
        return assembler.result()

"""Server reflection lets a generic client (as grpcurl does) discover and call the service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "gradtap.v1.GradientService"
HEALTH = "grpc.health.v1.Health"


@pytest.fixture
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as c:
        yield c


@pytest.fixture
def pool(channel: grpc.Channel) -> descriptor_pool.DescriptorPool:
    """A pool filled only from the server's reflection answers, not from gradtap.v1."""
    return descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))


def call_unary(
    channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, service: str, method: str
) -> Any:
    """Calls a unary method with an empty request built from reflected descriptors."""
    descriptor = pool.FindServiceByName(service).methods_by_name[method]
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    assert request_class.DESCRIPTOR.file.pool is pool
    rpc = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return rpc(request_class(), timeout=30)


def test_reflection_lists_the_gradient_and_health_services(channel: grpc.Channel) -> None:
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE, HEALTH} <= services, services


def test_reflection_resolves_list_models_and_a_dynamic_call_returns_the_seed_models(
    channel: grpc.Channel, pool: descriptor_pool.DescriptorPool
) -> None:
    service = pool.FindServiceByName(SERVICE)
    assert {"ListModels", "DescribeModel", "Analyze"} <= set(service.methods_by_name)
    method = service.methods_by_name["ListModels"]
    assert method.input_type.full_name == "gradtap.v1.ListModelsRequest"
    assert method.output_type.full_name == "gradtap.v1.ListModelsResponse"
    assert not method.client_streaming and not method.server_streaming

    response = call_unary(channel, pool, SERVICE, "ListModels")

    names = {m.name for m in response.models}
    assert {"seed-convnet", "seed-encoder", "seed-mlp"} <= names, names
    assert all(m.digest.startswith("sha256:") for m in response.models)


def test_reflection_resolves_the_streaming_analyze_method(
    pool: descriptor_pool.DescriptorPool,
) -> None:
    method = pool.FindServiceByName(SERVICE).methods_by_name["Analyze"]
    assert method.server_streaming and not method.client_streaming
    response = method.output_type
    assert [f.name for f in response.fields] == ["header", "chunks", "summary"]
    chunk = response.fields_by_name["chunks"].message_type
    assert [f.name for f in chunk.fields] == ["tensor_id", "offset", "data"]


def test_reflection_resolves_health_and_a_dynamic_check_says_serving(
    channel: grpc.Channel, pool: descriptor_pool.DescriptorPool
) -> None:
    response = call_unary(channel, pool, HEALTH, "Check")
    status = response.DESCRIPTOR.fields_by_name["status"].enum_type
    assert status.values_by_number[response.status].name == "SERVING"

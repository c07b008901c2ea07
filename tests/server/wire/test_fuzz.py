"""Fuzzed requests, mangled bytes and random bytes never crash the server or leak its insides.

Every call must end OK with a complete result, or with one of the documented refusals
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED) carrying a
google.rpc.Status with an UPPER_SNAKE ErrorInfo reason and no traceback or file path.
INTERNAL means a server bug. Bytes that do not parse as the method's request message get
INVALID_ARGUMENT with reason MALFORMED_REQUEST (grpcio alone would answer them a bare
INTERNAL, and keep memory for each).

Examples are derandomized so that a run in CI tests the same requests as a run here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from gradtap.client import Client, Objective
from gradtap.client._frames import Frames
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gradtap.v1 import gradtap_pb2 as pb

pytestmark = pytest.mark.slow

ANALYZE = "/gradtap.v1.GradientService/Analyze"
DESCRIBE = "/gradtap.v1.GradientService/DescribeModel"
LIST = "/gradtap.v1.GradientService/ListModels"

REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
REASON = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
LEAKS = ("Traceback", "/work", '.py"')
CALL_TIMEOUT = 60.0

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -------------------------------------------------------------------------------------------
# What the session server serves (tests/conftest.py): the seed models and the repository's.

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX = 2**32 - 1

WIDTHS = {
    pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT64: 8, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2,
    pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 4, pb.DTYPE_INT16: 2, pb.DTYPE_INT8: 1,
    pb.DTYPE_UINT8: 1, pb.DTYPE_BOOL: 1,
}  # fmt: skip
NUMPY = {
    pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT64: np.float64, pb.DTYPE_FLOAT16: np.float16,
    pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32, pb.DTYPE_INT16: np.int16,
    pb.DTYPE_INT8: np.int8, pb.DTYPE_UINT8: np.uint8, pb.DTYPE_BOOL: np.bool_,
}  # fmt: skip


@dataclass(frozen=True)
class Served:
    """What a request needs to know of a model to get past the server's checks."""

    inputs: list[tuple[int, tuple[int, ...]]]  # (dtype, shape after the batch dimension)
    output0: tuple[int, ...]  # output 0's shape after the batch dimension
    nodes: list[str]  # graph nodes and module paths
    params: list[str]


MODELS = {
    "seed-convnet": Served(
        [(pb.DTYPE_FLOAT32, (3, 28, 28))], (10,),
        ["x", "conv2d", "relu", "conv2d_1", "relu_1", "view", "linear", "conv1", "conv2", "fc"],
        ["conv1.weight", "conv1.bias", "conv2.weight", "fc.bias"],
    ),
    "seed-mlp": Served(
        [(pb.DTYPE_FLOAT32, (784,))], (10,),
        ["x", "linear", "relu", "linear_1", "relu_1", "linear_2", "fc1", "fc2", "fc3"],
        ["fc1.weight", "fc2.bias", "fc3.weight"],
    ),
    "seed-encoder": Served(
        [(pb.DTYPE_FLOAT32, (3, 28, 28))], (10,),
        ["image", "conv2d", "mean", "mul", "linear", "encoder", "decoder"],
        ["encoder.weight", "decoder.bias"],
    ),
    "tokens": Served(
        [(pb.DTYPE_INT64, (7,)), (pb.DTYPE_BOOL, (7,))], (4,),
        ["ids", "mask", "embedding", "linear", "tanh", "unsqueeze", "to", "mul", "sum_1",
         "sum_2", "div", "linear_1", "embed", "proj", "head"],
        ["embed.weight", "proj.bias", "head.weight"],
    ),
}  # fmt: skip
NODES = sorted({n for m in MODELS.values() for n in m.nodes})
PARAMS = sorted({p for m in MODELS.values() for p in m.params})
HOSTILE = [
    "", " ", "../../etc/passwd", "a/b", "seed-mlp\x00", " seed-mlp", "SEED-MLP", "x" * 129,
    "x" * 5000, "%s%n%x", "{0}", "' OR 1=1 --", "\u202eevil", "é", "🔥", "\\", "..", ".", "*",
    "seed-mlp/", "relu_1 ", "Relu_1", "layer1.0.conv1", "conv1.weight", "__class__",
]  # fmt: skip
DIGESTS = [
    "sha256:" + "0" * 64,
    "sha256:cf2640b26cb6a8aa638729dc16e24cb2db634d64a02cc9a0bc5a80c535c45b88",  # seed-mlp's
    "md5:abc",
    "y" * 3000,
]

# -------------------------------------------------------------------------------------------
# Strategies: structured requests
#
# Each request is drawn either tame (every enum known, names the model's own, tensors of
# the right dtype and shape) so that it reaches the engine, or wild (anything goes).


def enum_value(known: int, wild: bool) -> st.SearchStrategy[int]:
    """The enum's values 0..known; when wild, sometimes any int32 (proto3 enums are open)."""
    if not wild:
        return st.integers(0, known)
    return st.one_of(
        st.integers(0, known), st.integers(0, known), st.integers(INT32_MIN, INT32_MAX)
    )


dtypes = enum_value(max(WIDTHS) + 1, wild=True)
dims = st.one_of(
    st.integers(0, 8),
    st.integers(1, 8),
    st.integers(-3, -1),
    st.sampled_from([64, 65, 4096, 4097, 1 << 28, (1 << 28) + 1, 2**31, 2**40, 2**62]),
    st.integers(INT64_MIN, INT64_MAX),
)
any_names = st.one_of(st.sampled_from(NODES), st.sampled_from(HOSTILE), st.text(max_size=40))


def names(model: Served | None, wild: bool) -> st.SearchStrategy[str]:
    if model is None or wild:
        return any_names
    return st.sampled_from(model.nodes)


@st.composite
def random_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Any dtype and shape; data that fits the shape when that is small, else a few bytes.

    Shapes that would be huge if allocated (2^62 elements, or 4096 x 3 x 28 x 28 with ten
    bytes of data) must be refused before the server allocates anything.
    """
    dtype = draw(dtypes)
    shape = draw(st.lists(dims, max_size=10))
    elements = math.prod(shape) if all(d >= 0 for d in shape) else -1
    size = elements * WIDTHS.get(dtype, 1)
    if 0 <= size <= 4096 and draw(st.booleans()):
        length = size + draw(st.sampled_from([0, 0, 0, -1, 1]))
        data = draw(st.binary(min_size=max(length, 0), max_size=max(length, 0)))
    else:
        data = draw(st.binary(max_size=32))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def filled(dtype: int, shape: tuple[int, ...], fill: str, seed: int) -> bytes:
    """Bytes of a tensor of `dtype` and `shape`, made cheaply with numpy, not by hypothesis."""
    rng = np.random.default_rng(seed)
    if dtype == pb.DTYPE_BFLOAT16:
        return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).tobytes()
    kind = NUMPY[dtype]
    if dtype == pb.DTYPE_BOOL:
        if fill == "garbage":
            return rng.integers(0, 256, size=shape, dtype=np.uint8).tobytes()
        if fill == "random":
            return rng.integers(0, 2, size=shape).astype(np.bool_).tobytes()
        return np.full(shape, fill == "one", dtype=np.bool_).tobytes()
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        if fill == "garbage":
            return rng.integers(info.min, info.max, size=shape, dtype=kind, endpoint=True).tobytes()
        values = rng.integers(-1, 60, size=shape) if fill == "random" else np.full(shape, 0)
        return values.astype(kind).tobytes()
    specials = {"zero": 0.0, "one": 1.0, "nan": math.nan, "inf": math.inf, "huge": 6e4}
    if fill in specials:
        return np.full(shape, specials[fill], dtype=kind).tobytes()
    if fill == "garbage":
        raw = rng.integers(0, 256, size=math.prod(shape) * WIDTHS[dtype], dtype=np.uint8)
        return raw.tobytes()
    return rng.standard_normal(shape).astype(kind).tobytes()


fills = st.sampled_from(
    ["random", "random", "random", "zero", "one", "nan", "inf", "huge", "garbage"]
)
MUTATIONS = ["dtype", "rank", "dim", "short", "long", "declared"]


@st.composite
def plausible_tensors(
    draw: st.DrawFn, dtype: int, row: tuple[int, ...], batch: int, wild: bool
) -> pb.Tensor:
    """A tensor of the expected dtype and shape; when wild, perhaps a little off."""
    shape = (batch, *row)
    data = filled(dtype, shape, draw(fills), draw(st.integers(0, 2**16)))
    mutation = draw(st.sampled_from(["none", "none", *MUTATIONS])) if wild else "none"
    if mutation == "dtype":
        dtype = draw(dtypes)
    elif mutation == "rank":
        shape = draw(st.sampled_from([shape[1:], (*shape, 1), (1, *shape)]))
    elif mutation == "dim":
        shape = (*shape[:-1], shape[-1] + draw(st.sampled_from([-1, 1])))
    elif mutation == "short":
        data = data[: -draw(st.integers(1, 8))]
    elif mutation == "long":
        data = data + b"\x00" * draw(st.integers(1, 8))
    elif mutation == "declared":  # a huge declared shape over little data
        shape = (draw(st.sampled_from([4096, 1 << 20, 2**40])), *row)
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def sites(draw: st.DrawFn, model: Served | None, wild: bool) -> pb.ObjectiveSite:
    output = draw(st.one_of(st.integers(0, 2), st.integers(0, UINT32_MAX)) if wild else st.just(0))
    node = draw(st.one_of(st.just(""), st.just(""), names(model, wild)))
    return pb.ObjectiveSite(output=output, node=node)


OBJECTIVES = ["sum", "logit", "cross_entropy", "mse", "grad_outputs"]


@st.composite
def objectives(draw: st.DrawFn, model: Served | None, batch: int, wild: bool) -> pb.Objective:
    """Every kind of objective; its tensors shaped for output 0, or anything when wild."""
    kind = draw(st.sampled_from(["none", *OBJECTIVES] if wild else OBJECTIVES))
    site = draw(sites(model, wild))
    row = model.output0 if model is not None else (10,)
    reduction = draw(enum_value(pb.LOSS_REDUCTION_SUM + 1, wild))
    if kind == "none":
        objective = pb.Objective()
        objective.SetInParent()  # set, but naming no kind
        return objective
    if kind == "sum":
        return pb.Objective(sum=pb.SumObjective(site=site))
    if kind == "logit":
        index = st.integers(-2, 12) if wild else st.integers(0, row[0] - 1)
        if wild:
            index = st.one_of(index, st.integers(INT64_MIN, INT64_MAX))
        sizes = st.integers(0, 6) if wild else st.sampled_from([1, batch])
        values = draw(sizes.flatmap(lambda n: st.lists(index, min_size=n, max_size=n)))
        return pb.Objective(logit=pb.LogitObjective(site=site, index=values))
    tame = not wild or draw(st.booleans())
    if kind == "cross_entropy":
        if tame:
            labels = draw(plausible_tensors(pb.DTYPE_INT64, (), batch, wild))
        else:
            labels = draw(random_tensors())
        body = pb.CrossEntropyObjective(site=site, labels=labels, reduction=reduction)
        return pb.Objective(cross_entropy=body)
    if tame:
        tensor = draw(plausible_tensors(pb.DTYPE_FLOAT32, row, batch, wild))
    else:
        tensor = draw(random_tensors())
    if kind == "mse":
        return pb.Objective(mse=pb.MseObjective(site=site, expected=tensor, reduction=reduction))
    return pb.Objective(grad_outputs=pb.GradOutputsObjective(site=site, grad_output=tensor))


@st.composite
def targets(draw: st.DrawFn, model: Served | None, wild: bool) -> pb.TargetLayer:
    target = pb.TargetLayer(
        name=draw(names(model, wild)),
        capture=draw(enum_value(pb.CAPTURE_GRADIENT_AND_ACTIVATION, wild)),
        dtype=draw(
            st.one_of(st.just(0), st.sampled_from([1, 3, 4]), dtypes if wild else st.just(0))
        ),
    )
    if draw(st.booleans()):
        target.reduction.reduce = draw(enum_value(pb.REDUCE_MAX, wild))
        dim = st.integers(-2, 2)
        if wild:
            dim = st.one_of(dim, st.integers(-5, 5), st.integers(INT32_MIN, INT32_MAX))
        target.reduction.dims.extend(draw(st.lists(dim, max_size=4 if wild else 1)))
        topk = st.one_of(st.just(0), st.integers(1, 5))
        if wild:
            topk = st.one_of(topk, st.integers(0, UINT32_MAX))
        target.reduction.topk = draw(topk)
    return target


@st.composite
def analyze_requests(draw: st.DrawFn) -> pb.AnalyzeRequest:
    """A tame or a wild request; see above."""
    wild = draw(st.booleans())
    name = draw(st.sampled_from(sorted(MODELS)))
    if wild and draw(st.integers(0, 3)) == 0:
        name = draw(st.one_of(st.sampled_from(["resblock", "wide", "no-such-model"]), any_names))
    model = MODELS.get(name)
    batch = draw(
        st.one_of(st.integers(1, 4), st.sampled_from([0, 65])) if wild else st.integers(1, 4)
    )
    if model is not None and (not wild or draw(st.integers(0, 3)) > 0):
        inputs = [draw(plausible_tensors(dtype, row, batch, wild)) for dtype, row in model.inputs]
        if wild and draw(st.integers(0, 9)) == 0:
            inputs = inputs[:-1] if draw(st.booleans()) else [*inputs, draw(random_tensors())]
    else:
        inputs = draw(st.lists(random_tensors(), max_size=3))
    params = st.sampled_from(["*", *(model.params if model is not None else PARAMS)])
    request = pb.AnalyzeRequest(
        model=pb.Model(name=name),
        inputs=inputs,
        targets=draw(
            st.lists(targets(model, wild), max_size=4, unique_by=None if wild else lambda t: t.name)
        ),
        input_grads=draw(st.booleans()),
        outputs=draw(st.booleans()),
        param_grads=draw(st.lists(st.one_of(params, any_names) if wild else params, max_size=2)),
        precision=draw(enum_value(pb.PRECISION_BFLOAT16_AUTOCAST, wild)),
    )
    if wild and draw(st.integers(0, 4)) == 0:
        request.model.digest = draw(st.sampled_from(DIGESTS))
    if wild and draw(st.integers(0, 4)) == 0:
        return request  # no objective
    request.objective.CopyFrom(draw(objectives(model, batch, wild)))
    return request


# -------------------------------------------------------------------------------------------
# Strategies: bytes


def valid_requests() -> list[pb.AnalyzeRequest]:
    """Requests the server answers OK, one per served model, to mangle byte by byte."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 50, (1, 7), dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1, 0, 0]], dtype=np.bool_)
    image = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)

    def tensor(array: np.ndarray, dtype: int) -> pb.Tensor:
        return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())

    logit = pb.Objective(logit=pb.LogitObjective(index=[1]))
    return [
        pb.AnalyzeRequest(
            model=pb.Model(name="tokens"),
            inputs=[tensor(ids, pb.DTYPE_INT64), tensor(mask, pb.DTYPE_BOOL)],
            targets=[pb.TargetLayer(name="embedding", capture=pb.CAPTURE_GRADIENT_AND_ACTIVATION)],
            objective=pb.Objective(
                cross_entropy=pb.CrossEntropyObjective(labels=tensor(ids[:, 0] % 4, 5))
            ),
            outputs=True,
            param_grads=["head.weight"],
        ),
        pb.AnalyzeRequest(
            model=pb.Model(name="seed-mlp"),
            inputs=[tensor(rng.standard_normal((1, 784)).astype(np.float32), pb.DTYPE_FLOAT32)],
            targets=[
                pb.TargetLayer(
                    name="relu_1",
                    reduction=pb.Reduction(reduce=pb.REDUCE_ABS_MEAN, dims=[-1], topk=3),
                ),
                pb.TargetLayer(name="fc2", dtype=pb.DTYPE_BFLOAT16),
            ],
            objective=logit,
            input_grads=True,
        ),
        pb.AnalyzeRequest(
            model=pb.Model(name="seed-convnet"),
            inputs=[tensor(image, pb.DTYPE_FLOAT32)],
            targets=[pb.TargetLayer(name="relu", capture=pb.CAPTURE_ACTIVATION)],
            objective=pb.Objective(sum=pb.SumObjective(site=pb.ObjectiveSite(node="conv2"))),
            precision=pb.PRECISION_BFLOAT16_AUTOCAST,
        ),
        pb.AnalyzeRequest(
            model=pb.Model(name="seed-encoder"),
            inputs=[tensor(image, pb.DTYPE_FLOAT32)],
            targets=[pb.TargetLayer(name="mean")],
            objective=logit,
        ),
    ]


SEEDS = [r.SerializeToString() for r in valid_requests()]
DESCRIBE_SEEDS = [
    pb.DescribeModelRequest(model=pb.Model(name=name, digest=digest)).SerializeToString()
    for name in ("seed-mlp", "tokens")
    for digest in ("", "sha256:" + "0" * 64)
]


@st.composite
def mangled(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid request's bytes with bits flipped, bytes cut, inserted or dropped.

    Flips favour the first and last bytes: the tensor data sits in the middle, and most of
    the structure (model name, target and objective fields) lies around it.
    """
    raw = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not raw:
            break
        n = len(raw)
        where = draw(
            st.one_of(
                st.integers(0, min(n, 96) - 1),
                st.integers(max(0, n - 160), n - 1),
                st.integers(0, n - 1),
            )
        )
        operation = draw(st.sampled_from(["flip"] * 6 + ["cut", "insert", "drop"]))
        if operation == "flip":
            raw[where] ^= 1 << draw(st.integers(0, 7))
        elif operation == "cut":
            del raw[where:]
        elif operation == "insert":
            raw[where:where] = draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[where : where + draw(st.integers(1, 8))]
    return bytes(raw)


# -------------------------------------------------------------------------------------------
# Checking one call


def parses(kind: type[Message], raw: bytes) -> bool:
    try:
        kind.FromString(raw)
    except DecodeError:
        return False
    return True


def reproducer(raw: bytes, kind: type[Message]) -> str:
    try:
        text = text_format.MessageToString(kind.FromString(raw), as_one_line=True)[:4000]
    except DecodeError:
        text = "(does not parse)"
    return f"{kind.__name__} bytes.fromhex({raw.hex()!r})\n  as text: {text}"


def check_refusal(error: grpc.RpcError, raw: bytes, kind: type[Message]) -> None:
    """A non-OK status: documented, with parseable details and nothing of the server's insides."""
    code, message = error.code(), error.details() or ""
    where = reproducer(raw, kind)
    assert code in REFUSALS, f"{code.name} {message!r}: a server bug\n{where}"
    status = rpc_status.from_call(error)
    assert status is not None, f"{code.name} {message!r} has no grpc-status-details-bin\n{where}"
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            assert len(bad.field_violations) == 1 and bad.field_violations[0].field, where
    assert len(infos) == 1, f"{len(infos)} ErrorInfo details\n{where}"
    assert REASON.fullmatch(infos[0].reason), f"reason {infos[0].reason!r}\n{where}"
    assert infos[0].domain == "gradtap.v1", where
    event(f"{code.name} {infos[0].reason}")
    for leak in LEAKS:
        if leak.encode() not in raw:  # an echo of the caller's own text is no leak
            assert leak not in message, f"{message!r} leaks {leak!r}\n{where}"


def check_stream(responses: Iterator[pb.AnalyzeResponse]) -> None:
    """An OK Analyze stream carries a complete result: header, every byte, then a summary."""
    frames = Frames()
    for response in responses:
        frames.feed(response.header if response.HasField("header") else None, response.chunks)
        if response.HasField("summary"):
            frames.finish(response.summary.tensor_count)
    assert frames.finished, "the stream ended OK without a summary"
    event("OK")


def analyze_raw(channel: grpc.Channel, raw: bytes) -> None:
    call = channel.unary_stream(
        ANALYZE,
        request_serializer=lambda b: b,
        response_deserializer=pb.AnalyzeResponse.FromString,
    )
    try:
        check_stream(call(raw, timeout=CALL_TIMEOUT))
    except grpc.RpcError as e:
        check_refusal(e, raw, pb.AnalyzeRequest)


def unary_raw(channel: grpc.Channel, method: str, raw: bytes) -> None:
    request, response = {
        DESCRIBE: (pb.DescribeModelRequest, pb.DescribeModelResponse),
        LIST: (pb.ListModelsRequest, pb.ListModelsResponse),
    }[method]
    call = channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=response.FromString
    )
    try:
        call(raw, timeout=CALL_TIMEOUT)
        event("OK")
    except grpc.RpcError as e:
        check_refusal(e, raw, request)


# -------------------------------------------------------------------------------------------
# Fixtures: one channel, and the server answering as before once the fuzz is over

GOOD_X = np.random.default_rng(0).standard_normal((2, 784)).astype(np.float32)


def good_call(client: Client) -> tuple[np.ndarray, float]:
    result = client.analyze("seed-mlp", GOOD_X, ["relu_1"], Objective.logit(3))
    return result.gradients["relu_1"], result.loss


@pytest.fixture(scope="module")
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as c:
        yield c


@pytest.fixture(scope="module")
def before(address: str) -> tuple[np.ndarray, float]:
    with Client(address, timeout=CALL_TIMEOUT) as client:
        return good_call(client)


@pytest.fixture(autouse=True)
def still_serving(client: Client, before: tuple[np.ndarray, float]) -> Iterator[None]:
    """After each fuzz run the server is SERVING and gives the same numbers as before it."""
    yield
    assert client.health() == "SERVING"
    assert client.health("gradtap.v1.GradientService") == "SERVING"
    gradient, loss = good_call(client)
    np.testing.assert_array_equal(gradient, before[0])
    assert loss == before[1]


# -------------------------------------------------------------------------------------------
# The fuzz


@settings(FUZZ, max_examples=500)
@given(request=analyze_requests())
def test_structured_random_requests_get_a_result_or_a_documented_refusal(
    channel: grpc.Channel, request: pb.AnalyzeRequest
) -> None:
    analyze_raw(channel, request.SerializeToString())


@settings(FUZZ, max_examples=400)
@given(raw=mangled(SEEDS))
def test_mangled_analyze_bytes_get_a_result_or_a_documented_refusal(
    channel: grpc.Channel, raw: bytes
) -> None:
    analyze_raw(channel, raw)


@settings(FUZZ, max_examples=200)
@given(raw=mangled(DESCRIBE_SEEDS), method=st.sampled_from([DESCRIBE, LIST]))
def test_mangled_unary_bytes_get_an_answer_or_a_documented_refusal(
    channel: grpc.Channel, raw: bytes, method: str
) -> None:
    unary_raw(channel, method, raw)


@settings(FUZZ, max_examples=300)
@given(raw=st.binary(max_size=256), method=st.sampled_from([ANALYZE, DESCRIBE, LIST]))
def test_random_bytes_get_an_answer_or_a_documented_refusal(
    channel: grpc.Channel, raw: bytes, method: str
) -> None:
    if method == ANALYZE:
        analyze_raw(channel, raw)
    else:
        unary_raw(channel, method, raw)


def test_bytes_that_are_no_request_are_invalid_argument(channel: grpc.Channel) -> None:
    """Bytes that are no request get a documented INVALID_ARGUMENT, not grpcio's INTERNAL."""
    raw = b"\x0a\x05ab"  # field 1, five bytes announced, two sent
    assert not parses(pb.AnalyzeRequest, raw)
    call = channel.unary_stream(ANALYZE, request_serializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        list(call(raw, timeout=CALL_TIMEOUT))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None
    infos = [
        error_details_pb2.ErrorInfo()
        for d in status.details
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
    ]
    assert len(infos) == 1 and status.details[0].Unpack(infos[0])
    assert infos[0].reason == "MALFORMED_REQUEST"


@pytest.mark.parametrize("field", ["inputs", "labels"])
def test_an_empty_tensor_with_huge_other_dimensions_is_refused(
    channel: grpc.Channel, field: str
) -> None:
    empty = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**62, 2**62, 0])
    if field == "inputs":
        request = pb.AnalyzeRequest(model=pb.Model(name="seed-mlp"), inputs=[empty])
    else:
        labels = pb.CrossEntropyObjective(labels=empty)
        request = pb.AnalyzeRequest(
            model=pb.Model(name="seed-mlp"),
            inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 784], data=bytes(3136))],
            objective=pb.Objective(cross_entropy=labels),
        )
    call = channel.unary_stream(ANALYZE, request_serializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        list(call(request.SerializeToString(), timeout=CALL_TIMEOUT))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shape" in (info.value.details() or "")

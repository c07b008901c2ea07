"""The same-host shared-memory transport: the numbers are the stream's, regions are checked
before anything is written, and every hostile region gets one uninformative refusal."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradtap.client import Client, GradtapError, Objective, SharedRegion
from gradtap.client import _shm as client_shm
from gradtap.client._frames import Frames
from gradtap.client.aio import Client as AsyncClient
from gradtap.server import Settings, start
from gradtap.server.models.zoo import builtin_module
from gradtap.server.rpc.app import Running
from gradtap.server.wire import shm

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not shm.DIRECTORY.is_dir(), reason="needs /dev/shm (Linux)")

X = np.random.default_rng(7).standard_normal((4, 3, 28, 28)).astype(np.float32)
LABELS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def shm_server() -> Iterator[Running]:
    running = start("127.0.0.1:0", Settings(device="cpu", shared_memory=True))
    yield running
    running.server.stop(None).wait()


@pytest.fixture
def shm_client(shm_server: Running) -> Iterator[Client]:
    with Client(f"127.0.0.1:{shm_server.port}", timeout=60) as c:
        yield c


def analyze(c: Client, **kwargs: object) -> object:
    return c.analyze(
        "seed-convnet",
        X,
        ["relu_1"],
        Objective.cross_entropy(LABELS),
        input_grads=True,
        activations=True,
        **kwargs,  # type: ignore[arg-type]
    )


def test_results_written_into_shared_memory_equal_streamed_and_in_process(
    shm_client: Client,
) -> None:
    streamed = analyze(shm_client)
    written = analyze(shm_client, shared_memory=True)
    assert written.metadata["transport"] == "shared_memory"  # type: ignore[attr-defined]
    assert written.metadata["bytes_received"] == 0  # type: ignore[attr-defined]
    for a, b in (
        (streamed.gradients["relu_1"], written.gradients["relu_1"]),  # type: ignore[attr-defined]
        (streamed.activations["relu_1"], written.activations["relu_1"]),  # type: ignore[attr-defined]
        (streamed.input_grads[0], written.input_grads[0]),  # type: ignore[attr-defined]
        (streamed.outputs[0], written.outputs[0]),  # type: ignore[attr-defined]
    ):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    model = builtin_module("seed-convnet")
    image = torch.from_numpy(X.copy()).requires_grad_()
    logits, relu_1 = model(image)
    relu_1.retain_grad()
    F.cross_entropy(logits, torch.tensor(LABELS)).backward()
    assert relu_1.grad is not None and image.grad is not None
    got = written.gradients["relu_1"]  # type: ignore[attr-defined]
    np.testing.assert_allclose(got, relu_1.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        written.input_grads[0],
        image.grad.numpy(),
        rtol=1e-5,
        atol=1e-7,  # type: ignore[attr-defined]
    )


def test_a_reused_region_holds_views_that_the_next_call_overwrites(shm_client: Client) -> None:
    other = X[::-1].copy()
    with SharedRegion(8 << 20) as region:
        first = analyze(shm_client, shared_memory=region)
        gradient = first.gradients["relu_1"]  # type: ignore[attr-defined]
        kept = gradient.copy()
        assert not gradient.flags.owndata
        shm_client.analyze(
            "seed-convnet",
            other,
            ["relu_1"],
            Objective.cross_entropy(LABELS),
            input_grads=True,
            activations=True,
            shared_memory=region,
        )
        expected = shm_client.analyze(
            "seed-convnet", other, ["relu_1"], Objective.cross_entropy(LABELS)
        ).gradients["relu_1"]
        np.testing.assert_array_equal(gradient, expected)  # the view now shows the 2nd call
        assert not np.array_equal(kept, expected)
        token = (shm.DIRECTORY / region.name).read_bytes()[:32]
        assert token == region.message().token  # the server wrote after the token only
    assert not (shm.DIRECTORY / region.name).exists()
    np.testing.assert_array_equal(gradient, expected)  # arrays outlive the closed region


def test_a_region_made_per_call_grows_to_the_size_the_server_asks_for(
    shm_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_shm.Regions, "FIRST_SIZE", 4096)
    before = set(os.listdir(shm.DIRECTORY))
    streamed = analyze(shm_client)
    written = analyze(shm_client, shared_memory=True)
    needed = shm_client._region_sizes["seed-convnet"]
    sizes = [a.nbytes for a in (written.gradients["relu_1"], written.activations["relu_1"])]  # type: ignore[attr-defined]
    sizes += [written.input_grads[0].nbytes, written.outputs[0].nbytes, written.outputs[1].nbytes]  # type: ignore[attr-defined]
    assert needed == shm.layout(sizes)[1]
    np.testing.assert_array_equal(streamed.gradients["relu_1"], written.gradients["relu_1"])  # type: ignore[attr-defined]
    assert set(os.listdir(shm.DIRECTORY)) == before  # every region made was removed

    with SharedRegion(needed) as exact, SharedRegion(needed - 64) as short:
        analyze(shm_client, shared_memory=exact)
        with pytest.raises(GradtapError) as caught:
            analyze(shm_client, shared_memory=short)
    e = caught.value
    assert (e.code, e.reason, e.field) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SHARED_MEMORY_TOO_SMALL",
        "shared_memory.size",
    )
    assert e.details.metadata == {"required_bytes": str(needed)}


def test_the_asyncio_client_reads_shared_memory_too(shm_server: Running) -> None:
    async def run() -> tuple[np.ndarray, np.ndarray, str]:
        async with AsyncClient(f"127.0.0.1:{shm_server.port}", timeout=60) as c:
            streamed = await c.analyze(
                "seed-convnet", X, ["relu_1"], Objective.cross_entropy(LABELS)
            )
            with SharedRegion(8 << 20) as region:
                written = await c.analyze(
                    "seed-convnet",
                    X,
                    ["relu_1"],
                    Objective.cross_entropy(LABELS),
                    shared_memory=region,
                )
                gradient = written.gradients["relu_1"].copy()
            return streamed.gradients["relu_1"], gradient, written.metadata["transport"]

    streamed, written, transport = asyncio.run(run())
    assert transport == "shared_memory"
    np.testing.assert_array_equal(streamed, written)


def test_a_server_without_the_flag_refuses_shared_memory(client: Client) -> None:
    with pytest.raises(GradtapError) as caught:
        client.analyze(
            "seed-convnet", X, ["relu_1"], Objective.cross_entropy(LABELS), shared_memory=True
        )
    e = caught.value
    assert (e.code, e.reason, e.field) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SHARED_MEMORY_DISABLED",
        "shared_memory",
    )
    assert not [n for n in os.listdir(shm.DIRECTORY) if n.startswith("gradtap-")]


def _outside_address() -> str | None:
    """An address of this host that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            ip: str = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_a_caller_from_another_host_is_refused() -> None:
    assert shm.is_local("ipv4:127.0.0.1:5000") and shm.is_local("ipv6:[::1]:5000")
    assert shm.is_local("unix:/run/gradtap.sock")
    assert not shm.is_local("ipv4:10.0.0.7:5000") and not shm.is_local("ipv6:[fe80::1]:5000")
    ip = _outside_address()
    if ip is None:
        pytest.skip("this host has no address but loopback")
    running = start("0.0.0.0:0", Settings(device="cpu", shared_memory=True))
    try:
        with Client(f"{ip}:{running.port}", timeout=60) as c, SharedRegion(8 << 20) as region:
            with pytest.raises(GradtapError) as caught:
                analyze(c, shared_memory=region)
    finally:
        running.server.stop(None).wait()
    assert (caught.value.reason, caught.value.field) == ("SHARED_MEMORY_NOT_LOCAL", "shared_memory")


def test_a_caller_over_a_unix_socket_is_local(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'gradtap.sock'}"
    running = start(address, Settings(device="cpu", shared_memory=True))
    try:
        with Client(address, timeout=60) as c:
            assert analyze(c, shared_memory=True).metadata["transport"] == "shared_memory"  # type: ignore[attr-defined]
    finally:
        running.server.stop(None).wait()


def _call(port: int, region: pb.SharedMemoryRegion) -> grpc.RpcError:
    """Sends an Analyze naming `region` as any client could, and returns its error."""
    request = pb.AnalyzeRequest(
        model=pb.Model(name="seed-mlp"),
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 784], data=bytes(784 * 4))],
        targets=[pb.TargetLayer(name="relu")],
        objective=pb.Objective(sum=pb.SumObjective()),
        shared_memory=region,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            list(pb_grpc.GradientServiceStub(channel).Analyze(request, timeout=30))
        except grpc.RpcError as e:
            return e
    raise AssertionError("the call succeeded")


@pytest.fixture
def victim() -> Iterator[tuple[Path, bytes]]:
    """A region someone else made: a name, a size and a token the attacker does not know."""
    path = shm.DIRECTORY / f"gradtap-{secrets.token_hex(8)}"
    content = secrets.token_bytes(32) + bytes(4096 - 32)
    path.touch(mode=0o600)
    path.write_bytes(content)
    yield path, content
    path.unlink()


def test_hostile_regions_get_one_message_and_nothing_is_written(
    shm_server: Running, victim: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, content = victim
    token = content[:32]
    made: list[Path] = []

    def named(suffix: str) -> str:
        made.append(shm.DIRECTORY / f"gradtap-{suffix}{secrets.token_hex(6)}")
        return made[-1].name

    link = named("link")
    os.symlink(path, shm.DIRECTORY / link)
    hard = named("hard")
    os.link(path, shm.DIRECTORY / hard)
    directory = named("dir")
    os.mkdir(shm.DIRECTORY / directory)
    fifo = named("fifo")
    os.mkfifo(shm.DIRECTORY / fifo)
    shared = {}  # regions with the right token that others may read or write
    for mode in (0o640, 0o604, 0o620, 0o602):
        shared[mode] = named(f"mode{mode:o}")
        (shm.DIRECTORY / shared[mode]).write_bytes(content)
        os.chmod(shm.DIRECTORY / shared[mode], mode)
    cases = [
        pb.SharedMemoryRegion(name=path.name, size=4096, token=secrets.token_bytes(32)),  # guessed
        *(pb.SharedMemoryRegion(name=name, size=4096, token=token) for name in shared.values()),
        pb.SharedMemoryRegion(name=path.name, size=8192, token=token),  # another size
        pb.SharedMemoryRegion(name=link, size=4096, token=token),  # a symlink to it
        pb.SharedMemoryRegion(name=hard, size=4096, token=token),  # a hard link to it
        pb.SharedMemoryRegion(name=directory, size=4096, token=token),
        pb.SharedMemoryRegion(name=fifo, size=4096, token=token),  # must not block
        pb.SharedMemoryRegion(name="gradtap-doesnotexist0", size=4096, token=token),
    ]
    try:
        errors = [_call(shm_server.port, case) for case in cases]
        assert all((shm.DIRECTORY / name).read_bytes() == content for name in shared.values())
    finally:
        for p in made:
            p.rmdir() if p.is_dir() else p.unlink()
    assert {(e.code(), e.details()) for e in errors} == {
        (grpc.StatusCode.FAILED_PRECONDITION, shm._UNUSABLE)
    }
    assert path.read_bytes() == content
    assert "/dev/shm" not in shm._UNUSABLE

    bad_names = [
        "../" + path.name,
        "gradtap-../../etc/passwd",
        "/dev/shm/" + path.name,
        "other-region",
        "gradtap-short",
        "gradtap-" + "x" * 129,
        path.name + "\x00",
    ]
    for name in bad_names:
        e = _call(shm_server.port, pb.SharedMemoryRegion(name=name, size=4096, token=token))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "shared_memory.name" in e.details()
    for size, token_bytes, field in (
        (4096, token[:16], "token"),  # part of the token: all of it is needed
        (4096, token[:31], "token"),
        (4096, token + b"x", "token"),
        (4096, b"", "token"),
        (10, token, "size"),
    ):
        e = _call(
            shm_server.port, pb.SharedMemoryRegion(name=path.name, size=size, token=token_bytes)
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"shared_memory.{field}" in e.details()
    assert path.read_bytes() == content

    with Client(f"127.0.0.1:{shm_server.port}", timeout=60) as c:  # still serving
        assert analyze(c, shared_memory=True).metadata["transport"] == "shared_memory"  # type: ignore[attr-defined]


def test_a_region_not_yet_written_cannot_be_claimed_with_a_token_of_zeros(
    shm_server: Running,
) -> None:
    """A region made but not yet written starts with zeros: a token of zeros (of any
    length) names no one's secret, so it is refused before the region is opened."""
    path = shm.DIRECTORY / f"gradtap-{secrets.token_hex(8)}"
    path.touch(mode=0o600)
    try:
        os.truncate(path, 4096)
        for token in (bytes(16), bytes(32), b"\x01" * 32):
            e = _call(
                shm_server.port, pb.SharedMemoryRegion(name=path.name, size=4096, token=token)
            )
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "shared_memory.token" in e.details()
        assert path.read_bytes() == bytes(4096)
    finally:
        path.unlink()


def test_the_client_refuses_headers_pointing_outside_its_region() -> None:
    def header(offset: int, shape: list[int], shared: bool = True) -> pb.AnalyzeHeader:
        return pb.AnalyzeHeader(
            shared_memory=shared,
            tensors=[
                pb.TensorHeader(
                    id=0,
                    dtype=pb.DTYPE_FLOAT32,
                    shape=shape,
                    byte_size=4 * int(np.prod(shape)),
                    region_offset=offset,
                )
            ],
        )

    with SharedRegion(4096) as region:
        for bad in (header(0, [4]), header(4096 - 8, [4]), header(66, [4]), header(64, [2**40])):
            with pytest.raises(GradtapError, match="outside the shared-memory region"):
                Frames(region).feed(bad, [])
        frames = Frames(region)
        frames.feed(header(64, [4]), [])
        with pytest.raises(GradtapError, match="tensor bytes for a result in shared memory"):
            frames.feed(None, [pb.TensorChunk(tensor_id=0, data=b"x" * 16)])
    with pytest.raises(GradtapError, match="did not offer"):
        Frames().feed(header(64, [4]), [])


def test_the_guide_examples_run(shm_server: Running) -> None:
    guide = Path(__file__).resolve().parents[3] / "docs" / "shared-memory.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.DOTALL)
    assert blocks
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks:
        code = block.replace("127.0.0.1:50051", f"127.0.0.1:{shm_server.port}")
        exec(compile(code, "shared-memory.md", "exec"), namespace)
    assert isinstance(namespace["kept"], np.ndarray) and namespace["kept"].shape == (64, 64, 24, 24)

"""Soak: many valid and malformed requests against a server subprocess; memory must settle.

`make soak` (`python bench/soak.py`) starts `gradtap serve --port 0 --device cpu` as a
subprocess, sends it --requests requests (10,000 by default) from a few client threads over
127.0.0.1, mixing valid analyses with malformed, bit-flipped, truncated and random ones,
cancelled streams and calls that run past tiny deadlines, and reads the server's resident
memory (VmRSS) and thread count from /proc/<pid>/status before, after a warm-up and at the
end. The target: RSS grows less than 5% between the end of the warm-up and the end.

Every loop is bounded in count and in time (--max-seconds). Results go to
bench/results/soak.json; --write-docs also writes docs/reliability.md. The exit status is 1
when the server answered any request with INTERNAL or another undocumented status, broke a
stream, died, or stopped giving the same numbers; missing the memory target is reported, not
an error, since one run's RSS is noisy.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, `python bench/soak.py`, not with -m
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from google.protobuf.message import DecodeError, Message  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench import heavy, report  # noqa: E402
from bench._common import GradtapServer  # noqa: E402
from gradtap.v1 import gradtap_pb2 as pb  # noqa: E402

TARGET_GROWTH_PCT = 5.0
MiB = 1 << 20

ANALYZE = "/gradtap.v1.GradientService/Analyze"
DESCRIBE = "/gradtap.v1.GradientService/DescribeModel"
LIST = "/gradtap.v1.GradientService/ListModels"
REQUEST_TYPES: dict[str, type[Message]] = {
    ANALYZE: pb.AnalyzeRequest,
    DESCRIBE: pb.DescribeModelRequest,
    LIST: pb.ListModelsRequest,
}
REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
GRPCIO_UNPARSEABLE = "Exception deserializing request!"
UNPARSEABLE = "UNPARSEABLE"
"""The label for grpcio's own INTERNAL answer to bytes that are not the method's request."""
CLIENT_ERROR = "CLIENT_ERROR"
"""The label for an exception in the soak client itself; counted as a failure of the run."""


# -------------------------------------------------------------------------------------------
# The traffic: requests from a seeded random.Random (the fuzz suite's, without hypothesis)


@dataclass(frozen=True)
class Seed:
    """What a valid request for a built-in model needs."""

    row: tuple[int, ...]  # input shape after the batch dimension
    nodes: tuple[str, ...]  # graph nodes and module paths
    params: tuple[str, ...]


MODELS = {
    "seed-convnet": Seed(
        (3, 28, 28),
        ("x", "conv2d", "relu", "conv2d_1", "relu_1", "view", "linear", "conv1", "conv2", "fc"),
        ("conv1.weight", "conv2.bias", "fc.weight"),
    ),
    "seed-mlp": Seed(
        (784,),
        ("x", "linear", "relu", "linear_1", "relu_1", "linear_2", "fc1", "fc2", "fc3"),
        ("fc1.weight", "fc2.bias", "fc3.weight"),
    ),
    "seed-encoder": Seed(
        (3, 28, 28),
        ("image", "conv2d", "mean", "mul", "linear", "encoder", "decoder"),
        ("encoder.weight", "decoder.bias"),
    ),
}
CLASSES = 10  # every seed model's output 0 is (B, 10)
HOSTILE = [
    "", " ", "../../etc/passwd", "a/b", "seed-mlp\x00", "SEED-MLP", "x" * 129, "x" * 5000,
    "%s%n", "{0}", "\u202eevil", "🔥", "*", "relu_1 ", "layer1.0.conv1", "__class__",
]  # fmt: skip
BAD_SHAPES = [
    [-1, 784], [1, -5], [2**40, 784], [2**62, 2**62], [1] * 9, [0, 784], [4097, 784], [],
    [1, 3, 28], [1, 785],
]  # fmt: skip
# Traffic kinds and their shares of the requests.
MIX = {
    "valid": 45,
    "malformed": 25,
    "mangled": 12,
    "random_bytes": 4,
    "describe": 5,
    "list": 3,
    "deadline": 3,
    "cancelled": 3,
}


@dataclass
class Call:
    """One request as sent: its kind, method, serialized bytes and how the client treats it."""

    kind: str
    method: str
    raw: bytes
    timeout: float = 30.0
    cancel_after_first: bool = False


def _tensor(array: np.ndarray, dtype: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


def valid_request(rng: random.Random, batch: int | None = None) -> pb.AnalyzeRequest:
    """A request every check passes: a seed model, its own nodes, a well-formed objective."""
    name = rng.choice(sorted(MODELS))
    seed = MODELS[name]
    b = batch or rng.randint(1, 4)
    data = np.random.default_rng(rng.getrandbits(32))
    request = pb.AnalyzeRequest(
        model=pb.Model(name=name),
        inputs=[_tensor(data.standard_normal((b, *seed.row), dtype=np.float32), 1)],
        input_grads=rng.random() < 0.3,
        outputs=rng.random() < 0.3,
        precision=rng.choice([0, 0, 0, 1, 2]),
    )
    for node in rng.sample(seed.nodes, rng.randint(0, 3)):
        target = request.targets.add(name=node, capture=rng.randint(0, 3))
        if rng.random() < 0.2:
            target.reduction.reduce = rng.randint(1, 5)
        if rng.random() < 0.1:
            target.dtype = rng.choice([pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16])
    if rng.random() < 0.15:
        request.param_grads.append(rng.choice(("*", *seed.params)))
    if rng.random() < 0.1 and all(t.capture == pb.CAPTURE_ACTIVATION for t in request.targets):
        if not request.param_grads and not request.input_grads:
            return request  # activations only: no objective needed
    kind = rng.choice(["sum", "logit", "cross_entropy", "mse", "grad_outputs"])
    site = pb.ObjectiveSite()
    if kind == "sum":
        if rng.random() < 0.3:
            site.node = rng.choice(seed.nodes[1:])
        request.objective.sum.site.CopyFrom(site)
    elif kind == "logit":
        request.objective.logit.index.extend([rng.randrange(CLASSES)])
    elif kind == "cross_entropy":
        labels = data.integers(0, CLASSES, (b,), dtype=np.int64)
        request.objective.cross_entropy.labels.CopyFrom(_tensor(labels, pb.DTYPE_INT64))
        request.objective.cross_entropy.reduction = rng.randint(0, 2)
    else:
        values = _tensor(data.standard_normal((b, CLASSES), dtype=np.float32), 1)
        if kind == "mse":
            request.objective.mse.expected.CopyFrom(values)
        else:
            request.objective.grad_outputs.grad_output.CopyFrom(values)
    return request


def _corrupt(rng: random.Random, request: pb.AnalyzeRequest) -> None:
    """One of the ways a request goes wrong, applied in place."""
    how = rng.randrange(16)
    x = request.inputs[0] if request.inputs else request.inputs.add()
    if how == 0:
        request.model.name = rng.choice([*HOSTILE, "no-such-model", "wide"])
    elif how == 1:
        request.model.digest = rng.choice(["sha256:" + "0" * 64, "md5:1", "y" * 3000])
    elif how == 2:
        x.dtype = rng.choice([0, 2, 3, 5, 10, 11, -7, 2**31 - 1])
    elif how == 3:
        del x.shape[:]
        x.shape.extend(rng.choice(BAD_SHAPES))
    elif how == 4:
        x.data = x.data[: -rng.randint(1, 64)] if rng.random() < 0.5 else x.data + b"\x01"
    elif how == 5:
        request.targets.add(name=rng.choice(HOSTILE))
    elif how == 6:
        request.targets.add(name="relu", capture=rng.choice([4, 99, -1]))
    elif how == 7:
        target = request.targets.add(name="linear")
        target.reduction.reduce = rng.choice([0, 1, 6, -3])
        target.reduction.dims.extend([rng.choice([-9, 5, 2**31 - 1, 0])])
        target.reduction.topk = rng.choice([0, 5000, 2**32 - 1])
    elif how == 8:
        request.targets.add(name="x", dtype=rng.choice([5, 9, 42]))
    elif how == 9:
        request.objective.Clear()
        request.objective.SetInParent()  # set, naming no kind
    elif how == 10:
        request.objective.logit.index.extend([rng.choice([-1, 10, 2**63 - 1]), 3, 4, 5, 6])
    elif how == 11:
        labels = pb.Tensor(dtype=rng.choice([1, 5]), shape=[7, 7], data=bytes(8 * 49))
        request.objective.cross_entropy.labels.CopyFrom(labels)
    elif how == 12:
        request.objective.sum.site.output = rng.choice([2, 7, 2**32 - 1])
        request.objective.sum.site.node = rng.choice(["", *HOSTILE])
    elif how == 13:
        request.param_grads.append(rng.choice([*HOSTILE, "fc1.bias.grad"]))
    elif how == 14:
        request.precision = rng.choice([3, 77, -1])
    elif rng.random() < 0.5:
        del request.inputs[:]
    else:
        request.inputs.append(pb.Tensor(dtype=10, shape=[1, 7], data=bytes(7)))


def malformed_request(rng: random.Random) -> pb.AnalyzeRequest:
    request = valid_request(rng)
    for _ in range(rng.randint(1, 3)):
        _corrupt(rng, request)
    return request


def mangled(rng: random.Random, raw: bytes) -> bytes:
    """Bits flipped, bytes cut, inserted or dropped; mostly near the ends, where the
    structure is (the tensor data fills the middle)."""
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        n = len(out)
        where = rng.choice(
            [rng.randrange(min(n, 96)), rng.randrange(max(0, n - 160), n), rng.randrange(n)]
        )
        operation = rng.choice(["flip"] * 6 + ["cut", "insert", "drop"])
        if operation == "flip":
            out[where] ^= 1 << rng.randrange(8)
        elif operation == "cut":
            del out[where:]
        elif operation == "insert":
            out[where:where] = rng.randbytes(rng.randint(1, 8))
        else:
            del out[where : where + rng.randint(1, 8)]
    return bytes(out)


def make_call(rng: random.Random) -> Call:
    """The next request of the mix."""
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    if kind == "valid":
        return Call(kind, ANALYZE, valid_request(rng).SerializeToString())
    if kind == "malformed":
        return Call(kind, ANALYZE, malformed_request(rng).SerializeToString())
    if kind == "mangled":
        return Call(kind, ANALYZE, mangled(rng, valid_request(rng, batch=1).SerializeToString()))
    if kind == "random_bytes":
        method = rng.choice([ANALYZE, DESCRIBE, LIST])
        return Call(kind, method, rng.randbytes(rng.randint(0, 256)))
    if kind == "describe":
        name = rng.choice([*sorted(MODELS), *HOSTILE, "no-such-model"])
        raw = pb.DescribeModelRequest(model=pb.Model(name=name)).SerializeToString()
        return Call(kind, DESCRIBE, mangled(rng, raw) if rng.random() < 0.3 else raw)
    if kind == "list":
        return Call(kind, LIST, b"" if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 16)))
    if kind == "deadline":
        raw = valid_request(rng).SerializeToString()
        return Call(kind, ANALYZE, raw, timeout=rng.uniform(0.0005, 0.01))
    # cancelled: a result of several messages, abandoned after the first
    request = valid_request(rng, batch=16)
    request.model.name = "seed-convnet"
    del request.inputs[:]
    x = np.random.default_rng(rng.getrandbits(32)).standard_normal((16, 3, 28, 28))
    request.inputs.append(_tensor(x.astype(np.float32), 1))
    del request.targets[:]
    request.targets.add(name="relu", capture=pb.CAPTURE_GRADIENT_AND_ACTIVATION)
    request.ClearField("objective")
    request.objective.sum.SetInParent()
    request.param_grads[:] = []
    request.outputs = True
    return Call(kind, ANALYZE, request.SerializeToString(), cancel_after_first=True)


# -------------------------------------------------------------------------------------------
# Sending and classifying


def _parses(method: str, raw: bytes) -> bool:
    try:
        REQUEST_TYPES[method].FromString(raw)
    except DecodeError:
        return False
    return True


def _identity(raw: bytes) -> bytes:
    return raw


@dataclass
class Outcome:
    """How one call ended: a status name (or UNPARSEABLE), and why it is a bug if it is one."""

    label: str
    bug: str = ""
    message: str = ""


def send(channel: grpc.Channel, call: Call) -> Outcome:
    """Sends a call's raw bytes and says how it ended."""
    try:
        if call.method == ANALYZE:
            stream = channel.unary_stream(
                ANALYZE,
                request_serializer=_identity,
                response_deserializer=pb.AnalyzeResponse.FromString,
            )(call.raw, timeout=call.timeout)
            if call.cancel_after_first:
                next(stream)
                stream.cancel()
                list(stream)
                return Outcome("OK")  # the server finished before the cancel arrived
            messages = list(stream)
            if not messages or not messages[0].HasField("header"):
                return Outcome("OK", bug="an OK stream without a header")
            if not messages[-1].HasField("summary"):
                return Outcome("OK", bug="an OK stream without a summary")
        else:
            response = (
                pb.DescribeModelResponse if call.method == DESCRIBE else pb.ListModelsResponse
            )
            channel.unary_unary(
                call.method, request_serializer=_identity, response_deserializer=response.FromString
            )(call.raw, timeout=call.timeout)
        return Outcome("OK")
    except grpc.RpcError as e:
        code: grpc.StatusCode = e.code()
        message = e.details() or ""
        if code == grpc.StatusCode.INTERNAL and message == GRPCIO_UNPARSEABLE:
            if _parses(call.method, call.raw):
                return Outcome(UNPARSEABLE, "grpcio could not parse a valid request", message)
            return Outcome(UNPARSEABLE)
        expected = set(REFUSALS)
        if call.kind == "deadline":
            expected |= {"DEADLINE_EXCEEDED", "CANCELLED"}
        if call.kind == "cancelled":
            expected.add("CANCELLED")
        if code.name not in expected:
            return Outcome(code.name, f"{code.name} is not a documented answer", message)
        return Outcome(code.name)


def _proc(pid: int) -> dict[str, int]:
    """The server's resident memory (bytes) and thread count, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "VmRSS":
                values["rss_bytes"] = int(rest.split()[0]) * 1024
            elif key == "Threads":
                values["threads"] = int(rest.split()[0])
    return values


GOOD = pb.AnalyzeRequest(
    model=pb.Model(name="seed-mlp"),
    inputs=[_tensor(np.random.default_rng(0).standard_normal((2, 784), dtype=np.float32), 1)],
    targets=[pb.TargetLayer(name="relu_1")],
    objective=pb.Objective(logit=pb.LogitObjective(index=[3])),
)


def good_numbers(channel: grpc.Channel) -> tuple[bytes, float]:
    """The gradient bytes and loss of one fixed request, to compare before and after."""
    call = channel.unary_stream(
        ANALYZE,
        request_serializer=pb.AnalyzeRequest.SerializeToString,
        response_deserializer=pb.AnalyzeResponse.FromString,
    )
    messages = list(call(GOOD, timeout=60))
    data = b"".join(c.data for m in messages for c in m.chunks if c.tensor_id == 0)
    return data, messages[-1].summary.loss


def serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Tally:
    """What every call came to, shared by the client threads."""

    seed: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    bugs: list[dict[str, Any]] = field(default_factory=list)
    bug_count: int = 0

    def take(self, limit: int, deadline: float) -> int | None:
        """The next request's number, or None once `limit` are issued or time is up."""
        with self.lock:
            if self.issued >= limit or time.monotonic() >= deadline:
                return None
            self.issued += 1
            return self.issued - 1

    def record(self, call: Call, outcome: Outcome) -> None:
        with self.lock:
            self.codes[outcome.label] += 1
            self.by_kind.setdefault(call.kind, Counter())[outcome.label] += 1
            if outcome.bug:
                self.bug_count += 1
                if len(self.bugs) < 20:
                    self.bugs.append(
                        {
                            "kind": call.kind,
                            "method": call.method,
                            "status": outcome.label,
                            "why": outcome.bug,
                            "message": outcome.message[:500],
                            "request_base64": base64.b64encode(call.raw[:20000]).decode(),
                        }
                    )


def run_phase(address: str, tally: Tally, limit: int, deadline: float, threads: int) -> None:
    """Client threads send requests until `limit` have been issued in all or time is up."""

    def worker() -> None:
        with grpc.insecure_channel(address) as channel:
            while (n := tally.take(limit, deadline)) is not None:
                call = Call("unbuilt", ANALYZE, b"")
                try:
                    call = make_call(random.Random(tally.seed * 1_000_003 + n))
                    call.timeout = min(call.timeout, max(1.0, deadline - time.monotonic() + 10))
                    outcome = send(channel, call)
                except Exception as e:  # noqa: BLE001 - the soak's own failure, counted as one
                    outcome = Outcome(CLIENT_ERROR, "the soak client failed", repr(e))
                tally.record(call, outcome)

    pool = [threading.Thread(target=worker, name=f"soak-{i}") for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


# -------------------------------------------------------------------------------------------
# The run


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/soak.py",
        description="Soak a gradtap server subprocess with mixed valid and malformed requests.",
    )
    parser.add_argument("--requests", type=int, default=10_000, metavar="N", help="(10000)")
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, metavar="S",
        help="hard cap on the traffic's wall time, whatever the count (300)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=4, metavar="N", help="client threads (4)")
    parser.add_argument(
        "--warmup", type=int, metavar="N", help="requests before the baseline sample (10%%)"
    )
    parser.add_argument(
        "--sample-every", type=int, metavar="N", help="requests between samples (10%%)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (0)")
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="results (bench/results/soak.json)"
    )
    parser.add_argument(
        "--heavy-seconds", type=float, default=60.0, metavar="S",
        help="the heavy-valid phase's client deadline; 0 skips the phase (60)",
    )  # fmt: skip
    parser.add_argument("--write-docs", action="store_true", help="also write the docs page")
    parser.add_argument(
        "--docs", type=Path, metavar="PATH", help="where --write-docs writes (docs/reliability.md)"
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.threads < 1 or args.max_seconds <= 0:
        parser.error("--requests and --threads must be at least 1, --max-seconds positive")
    args.warmup = args.warmup if args.warmup is not None else max(1, args.requests // 10)
    args.sample_every = args.sample_every or max(1, args.requests // 10)
    if not 0 < args.warmup < args.requests:
        parser.error("--warmup must lie between 0 and --requests")
    return args


def _python() -> str:
    """This interpreter as typed at the repository root, e.g. `.venv/bin/python`."""
    python = os.path.relpath(sys.executable, ROOT)
    return sys.executable if python.startswith("..") else python


def _growth(before: int, after: int) -> float:
    return (after - before) / before * 100 if before else math.nan


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Starts the server, runs the traffic in phases and returns the results."""
    threads = len(os.sched_getaffinity(0))
    server = GradtapServer(threads)
    results: dict[str, Any] = {
        "command": " ".join([_python(), "bench/soak.py", *sys.argv[1:]]),
        "machine": report.machine(),
        "config": {
            "requests": args.requests,
            "max_seconds": args.max_seconds,
            "client_threads": args.threads,
            "warmup": args.warmup,
            "sample_every": args.sample_every,
            "seed": args.seed,
            "mix_percent": MIX,
            "server": " ".join(["gradtap", *server.command[1:]]),
            "server_torch_threads": threads,
        },
    }
    tally = Tally(args.seed)
    samples: list[dict[str, Any]] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            before = good_numbers(channel)

            def sample(phase: str, seconds: float) -> dict[str, Any]:
                entry: dict[str, Any] = {
                    "phase": phase,
                    "requests": tally.issued,
                    "seconds": round(seconds, 2),
                }
                entry.update(_proc(server.pid))
                samples.append(entry)
                print(
                    f"soak: {tally.issued:>6} requests  {seconds:6.1f} s  "
                    f"RSS {entry['rss_bytes'] / MiB:7.1f} MiB  threads {entry['threads']}",
                    file=sys.stderr,
                    flush=True,
                )
                return entry

            start = sample("start", 0.0)
            t0 = time.monotonic()
            deadline = t0 + args.max_seconds
            run_phase(server.address, tally, args.warmup, deadline, args.threads)
            warm = sample("after warm-up", time.monotonic() - t0)
            limit = args.warmup
            while limit < args.requests and time.monotonic() < deadline:
                limit = min(limit + args.sample_every, args.requests)
                run_phase(server.address, tally, limit, deadline, args.threads)
                sample("traffic", time.monotonic() - t0)
            seconds = time.monotonic() - t0
            end = samples[-1]
            end["phase"] = "end"
            heavy_results = None
            if args.heavy_seconds > 0 and server.process.poll() is None:
                heavy_results = _heavy(server.address, server.pid, args.heavy_seconds)
            alive = server.process.poll() is None
            still_serving = alive and serving(channel)
            same = alive and good_numbers(channel) == before
    finally:
        server.stop()
    done = sum(tally.codes.values())
    growth = _growth(warm["rss_bytes"], end["rss_bytes"])
    results.update(
        requests=done,
        stopped_by="count" if tally.issued >= args.requests else "time",
        seconds=round(seconds, 2),
        throughput_rps=round(done / seconds, 1) if seconds else None,
        codes=dict(tally.codes.most_common()),
        by_kind={k: dict(v.most_common()) for k, v in sorted(tally.by_kind.items())},
        internal=tally.codes.get("INTERNAL", 0),
        grpcio_unparseable=tally.codes.get(UNPARSEABLE, 0),
        bug_count=tally.bug_count,
        bugs=tally.bugs,
        memory={"start": start, "after_warmup": warm, "end": end, "samples": samples},
        rss_growth_after_warmup_pct=round(growth, 2),
        rss_growth_from_start_pct=round(_growth(start["rss_bytes"], end["rss_bytes"]), 2),
        threads_growth_after_warmup=end["threads"] - warm["threads"],
        target={
            "goal": f"RSS growth after warm-up < {TARGET_GROWTH_PCT:g}%",
            "measured_pct": round(growth, 2),
            "met": growth < TARGET_GROWTH_PCT,
        },
        after={"server_alive": alive, "serving": still_serving, "same_numbers": same},
        load_average_at_end=[round(v, 2) for v in os.getloadavg()],
        heavy=heavy_results,
    )
    return results


def _heavy(address: str, pid: int, seconds: float) -> dict[str, Any]:
    """The heavy-valid phase (bench/heavy.py), then the server's RSS once it settled."""
    import torch
    from gradtap.server.engine.memory import DEFAULT_BUDGET, machine_bytes, parse_budget

    budget = parse_budget(DEFAULT_BUDGET, machine_bytes(torch.device("cpu")))
    before = _proc(pid)["rss_bytes"]
    print(f"soak: heavy-valid phase, deadline {seconds:g} s", file=sys.stderr, flush=True)
    results = heavy.heavy_phase(address, pid, budget, seconds)
    settled = before
    for _ in range(300):  # up to a minute for the abandoned work to stop and give memory back
        settled = _proc(pid)["rss_bytes"]
        if settled <= 1.1 * before:
            break
        time.sleep(0.2)
    results.update(rss_before_bytes=before, rss_settled_bytes=settled)
    return results


# -------------------------------------------------------------------------------------------
# Reporting


def _mib(value: int) -> str:
    return f"{value / MiB:,.1f} MiB"


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def table(results: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    memory = results["memory"]
    start, warm, end = memory["start"], memory["after_warmup"], memory["end"]
    target = results["target"]
    rows = [
        ("requests answered", f"{results['requests']:,} (stopped by {results['stopped_by']})"),
        ("traffic wall time", f"{results['seconds']:.1f} s"),
        ("throughput", f"{results['throughput_rps']:,.0f} requests/s"),
    ]
    for label, count in results["codes"].items():
        name = "INTERNAL from grpcio: bytes that are no request" if label == UNPARSEABLE else label
        rows.append((f"status {name}", f"{count:,}"))
    rows += [
        ("INTERNAL from the server (bugs)", f"{results['internal']:,}"),
        ("undocumented answers and broken streams (bugs)", f"{results['bug_count']:,}"),
        (
            "server RSS: start / after warm-up / end",
            f"{_mib(start['rss_bytes'])} / {_mib(warm['rss_bytes'])} / {_mib(end['rss_bytes'])}",
        ),
        (
            "RSS growth after warm-up",
            f"{results['rss_growth_after_warmup_pct']:+.2f}% (target < {TARGET_GROWTH_PCT:g}%: "
            f"{'met' if target['met'] else '**not met**'})",
        ),
        ("RSS growth from start", f"{results['rss_growth_from_start_pct']:+.2f}%"),
        (
            "server threads: start / after warm-up / end",
            f"{start['threads']} / {warm['threads']} / {end['threads']}",
        ),
        ("still SERVING afterwards", _yes(results["after"]["serving"])),
        ("same numbers before and after", _yes(results["after"]["same_numbers"])),
    ]
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def samples_table(results: dict[str, Any]) -> str:
    lines = ["| after requests | seconds | RSS | threads |", "|---:|---:|---:|---:|"]
    for s in results["memory"]["samples"]:
        lines.append(
            f"| {s['requests']:,} ({s['phase']}) | {s['seconds']:.1f} | {_mib(s['rss_bytes'])} "
            f"| {s['threads']} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    mix = ", ".join(f"{kind} {share}%" for kind, share in cfg["mix_percent"].items())
    verdict = "met" if results["target"]["met"] else "not met"
    return f"""\
# Reliability

This page is generated by `make soak` (`python bench/soak.py --write-docs`); edit
`bench/soak.py`, not this file. The raw numbers are in `bench/results/soak.json`.

Two things stand behind gradtap's claim to survive hostile traffic:

- **The fuzz suite**, `tests/test_fuzz.py`, runs in `make test`: hypothesis draws structured
  `AnalyzeRequest`s (hostile model names, unknown enum values, negative, huge and rank-9
  shapes, data of the wrong length, garbage targets and objectives of every kind),
  bit-flipped and truncated copies of valid requests sent as raw bytes, and random bytes, to
  `Analyze`, `DescribeModel` and `ListModels`. Every call must end OK with a complete result
  or with a documented refusal (`INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION`,
  `RESOURCE_EXHAUSTED`) whose `grpc-status-details-bin` parses, with an UPPER_SNAKE
  `ErrorInfo` reason and no traceback or file path in the message. Afterwards the server
  must still be `SERVING` and give the same numbers as before.
- **The soak** below: many such requests from several threads against a server subprocess,
  watching its memory and threads.

Bytes that do not parse as the method's request message get `INVALID_ARGUMENT` with reason
`MALFORMED_REQUEST`. (grpcio alone answers them a bare `INTERNAL`, "Exception deserializing
request!", and kept about 20 KiB of memory for each such call: the soak found that, and the
server now parses requests itself.) Any `INTERNAL` is a bug.

## Target

The server's resident memory (VmRSS) grows **less than {TARGET_GROWTH_PCT:g}%** from the end
of the warm-up ({cfg["warmup"]:,} requests) to the end of the run. This run: **{verdict}**
({results["rss_growth_after_warmup_pct"]:+.2f}%).

## Machine and run

| | |
|---|---|
| command | `{results["command"]}` |
| date | {m["date"]} |
| CPU | {m["cpu_model"]} |
| nproc | {m["nproc"]} |
| memory | {m["memory_gib"]} GiB |
| Python / torch / grpcio | {m["python"]} / {m["torch"]} / {m["grpcio"]} |
| server | `{cfg["server"]}` (torch threads: {cfg["server_torch_threads"]}) |
| client | {cfg["client_threads"]} threads, one channel each, all traffic on 127.0.0.1 |
| requests / time cap | {cfg["requests"]:,} / {cfg["max_seconds"]:g} s |
| mix (seed {cfg["seed"]}) | {mix} |
| load average at start / end | {m["load_average_at_start"]} / {results["load_average_at_end"]} |

Memory is read with the client threads stopped, at the end of the warm-up and after every
{cfg["sample_every"]:,} requests. When the target is missed, the samples below tell a leak
from noise: memory still climbing at the end of the run points to something that grows with
the traffic, while samples that wander around one level are the allocator's.

The throughput is indicative only: the client, the server and, while this ran, other
engineers' test suites shared the machine's {m["nproc"]} cores. The memory figures do not
depend on speed.

## Results

{table(results)}

### Memory over the run

{samples_table(results)}

## Heavy valid use (issue 11)

After the traffic, every heavy probe of issue 11 runs at once against the same server, with
default settings (its memory budget is half the machine's memory), while one normal caller
keeps sending a small `Analyze`. *Before* is what the issue measured; *this run* is each
probe's outcome and its longest call. See [memory.md](memory.md) for the budget.

{heavy.table(results.get("heavy"))}

The mix: *valid* analyses of the seed models (random batch, targets, captures, reductions,
transfer dtypes, parameter gradients, precision, every objective kind); *malformed* ones
(one to three fields broken); *mangled* ones (a valid request's bytes with bits flipped, bytes
cut, inserted or dropped); *random bytes* to every method; *describe* and *list* calls, some
mangled; *deadline* calls, valid but given 0.5–10 ms; and *cancelled* ones, multi-message
results abandoned after the first message. Statuses by kind are in the JSON (`by_kind`).
"""


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = soak(args)
    out = args.json or ROOT / "bench" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(table(results))
    for bug in results["bugs"]:
        print(f"BUG ({bug['kind']}, {bug['method']}): {bug['why']}: {bug['message']!r}")
        print(f"  request (base64): {bug['request_base64'][:400]}")
    print(f"\nwrote {out}", file=sys.stderr)
    if args.write_docs:
        docs = args.docs or ROOT / "docs" / "reliability.md"
        docs.write_text(markdown(results))
        print(f"wrote {docs}", file=sys.stderr)
    healthy = all(results["after"].values())
    return 0 if results["bug_count"] == 0 and healthy else 1


if __name__ == "__main__":
    sys.exit(main())

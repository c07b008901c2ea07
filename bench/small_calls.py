"""Small calls: latency of a batch-1 seed-mlp analysis against a trivial gRPC call."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._common import (
    ROOT,
    SERVING,
    Child,
    Config,
    GradtapServer,
    Section,
    quantile,
    stats,
    thread_env,
)

TARGET_P50_MS = 0.6


def run(cfg: Config, address: str) -> Section:
    import grpc
    import grpc.experimental
    from gradtap.client import Client, Objective
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .peers import naive_server

    section = Section("small_calls")
    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    objective = Objective.sum()
    bare = naive_server(cfg.threads)
    inline = GradtapServer(cfg.threads, extra=["--compute-threads", "0"])
    single_threaded = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)
    with (
        Client(address, timeout=60) as client,
        Client(inline.address, timeout=60) as inline_client,
        grpc.insecure_channel(address) as channel,
        grpc.insecure_channel(bare.match.group(1), options=[single_threaded]) as bare_channel,
    ):
        health_stub = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()
        ping = bare_channel.unary_unary("/naive.Tensors/Ping")
        ping_stream = bare_channel.unary_stream("/naive.Tensors/PingStream")

        def bare_unary() -> None:
            ping(b"", timeout=60)

        def bare_stream() -> None:
            for _ in ping_stream(b"", timeout=60):
                pass

        def analyze() -> None:
            client.analyze("seed-mlp", x, ["relu_1"], objective)

        def analyze_inline() -> None:
            inline_client.analyze("seed-mlp", x, ["relu_1"], objective)

        def health() -> None:
            health_stub.Check(check, timeout=60)

        def list_models() -> None:
            client.list_models()

        calls: dict[str, Callable[[], None]] = {
            "analyze": analyze,
            "analyze_inline": analyze_inline,
            "health_check": health,
            "list_models": list_models,
            "bare_unary": bare_unary,
            "bare_stream": bare_stream,
        }
        for fn in calls.values():
            for _ in range(cfg.small_warmup):
                fn()
        # Blocks of calls, kinds alternating, so that all three see the same machine.
        latencies: dict[str, list[float]] = {k: [] for k in calls}
        block_p50: dict[str, list[float]] = {k: [] for k in calls}
        block_p99: dict[str, list[float]] = {k: [] for k in calls}
        blocks = max(cfg.repeats, 1)
        per_block = max(cfg.small_calls // blocks, 1)
        deadline = time.perf_counter() + cfg.budget_s * 3
        for b in range(blocks):
            names = list(calls)
            order = names[b % len(names) :] + names[: b % len(names)]
            for name in order:
                fn = calls[name]
                block: list[float] = []
                for _ in range(per_block):
                    t0 = time.perf_counter()
                    fn()
                    block.append((time.perf_counter() - t0) * 1e3)
                    if time.perf_counter() > deadline:
                        break
                latencies[name].extend(block)
                block_p50[name].append(quantile(block, 0.5))
                block_p99[name].append(quantile(block, 0.99))
            if time.perf_counter() > deadline:
                break
    bare.stop()
    inline.stop()
    p50 = {k: quantile(v, 0.5) for k, v in latencies.items()}
    p99 = {k: quantile(v, 0.99) for k, v in latencies.items()}
    ratio_blocks = [a / h for a, h in zip(block_p50["analyze"], block_p50["health_check"])]
    labels = {
        "analyze": "gradtap analyze seed-mlp, batch 1, 1 target, sum",
        "analyze_inline": "the same, server with --compute-threads 0 (no hand-off to a compute "
        "thread)",
        "health_check": "gRPC health Check (trivial unary, reference)",
        "list_models": "gradtap ListModels (trivial unary)",
        "bare_unary": "bare grpcio server, no gradtap: unary call, 100 bytes back",
        "bare_stream": "bare grpcio server, no gradtap: streaming call, one 100-byte message",
    }
    for name, label in labels.items():
        for q, by_block, overall in (("p50", block_p50, p50), ("p99", block_p99, p99)):
            section.row(
                f"{label}: {q}",
                "ms",
                by_block[name],
                ratio=[a / h for a, h in zip(by_block[name], by_block["health_check"])],
                ratio_to=f"health Check {q}",
                calls=len(latencies[name]),
            )
            # the quantile over every call; min and max stay those of the blocks
            section.rows[-1]["median"] = overall[name]
    section.target(
        "analyze p50 (loopback)",
        f"<= {TARGET_P50_MS} ms",
        p50["analyze"],
        p50["analyze"] <= TARGET_P50_MS,
        "ms",
    )
    handoff = [a - b for a, b in zip(block_p50["analyze"], block_p50["analyze_inline"])]
    section.info["compute_handoff_ms"] = stats(handoff)
    try:
        steps = stages(cfg)
    except Exception as e:  # noqa: BLE001 - a diagnostic: reported, the section stands
        section.unavailable("where a call's time goes", f"{type(e).__name__}: {e}"[:300])
    else:
        section.info["stages_us"] = steps
        for name, us in steps.items():
            if name != "calls":
                section.row(f"stage: {name}", "us", [us], calls=steps["calls"])
    section.info.update(
        calls_per_kind=len(latencies["analyze"]),
        warmup=cfg.small_warmup,
        analyze_over_health_p50=stats(ratio_blocks),
    )
    section.notes.append(
        f"{len(latencies['analyze'])} calls of each kind after {cfg.small_warmup} warm-up "
        f"calls, in {blocks} alternating blocks; p50/p99 over all calls, spread = min-max of "
        "the blocks' p50s. Analyze is a server-streaming method: the bare grpcio rows show "
        "what gRPC alone costs for a unary and a one-message streaming call on this machine, "
        "with no gradtap code on either side."
    )
    return section


def stages(cfg: Config) -> dict[str, float]:
    """Median microseconds of each stage of a seed-mlp call (bench/_stages.py): a server
    and a client with a timestamp at each stage, 1000 calls (100 with --quick)."""
    from ._stages import stages as line_up

    with tempfile.TemporaryDirectory(prefix="gradtap-stages-") as tmp:
        server_out, client_out = Path(tmp, "server.json"), Path(tmp, "client.json")
        env = thread_env(cfg.threads) | {"GRADTAP_STAGES_OUT": str(server_out)}
        command = [sys.executable, "-m", "bench._stages", "serve", "--port", "0"]
        server = Child([*command, "--device", "cpu", "--grace", "0"], SERVING, env, 180)
        try:
            address = f"127.0.0.1:{server.match.group(3)}"
            calls = 100 if cfg.quick else 1000
            done = subprocess.run(
                [sys.executable, "-m", "bench._stages", "call", address, str(calls),
                 str(client_out)],
                cwd=ROOT, env=thread_env(cfg.threads), capture_output=True, text=True,
                timeout=300, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
        finally:
            server.stop()
        return line_up(json.loads(server_out.read_text()), json.loads(client_out.read_text()))

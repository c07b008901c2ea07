"""Small calls: latency of a batch-1 seed-mlp analysis against a trivial gRPC call."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ._common import Config, Section, quantile, stats

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
    single_threaded = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)
    with (
        Client(address, timeout=60) as client,
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

        def health() -> None:
            health_stub.Check(check, timeout=60)

        def list_models() -> None:
            client.list_models()

        calls: dict[str, Callable[[], None]] = {
            "analyze": analyze,
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
    p50 = {k: quantile(v, 0.5) for k, v in latencies.items()}
    p99 = {k: quantile(v, 0.99) for k, v in latencies.items()}
    ratio_blocks = [a / h for a, h in zip(block_p50["analyze"], block_p50["health_check"])]
    labels = {
        "analyze": "gradtap analyze seed-mlp, batch 1, 1 target, sum",
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

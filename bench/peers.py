"""Peers: gradtap next to in-process PyTorch, Captum, and the naive remote approaches."""

from __future__ import annotations

import io
import re
import struct
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._common import (
    GB,
    Child,
    Config,
    Section,
    interleaved,
    proc_status,
    ratios,
    reset_peak_rss,
    thread_env,
)
from .models import REPEAT_WIDTH, repeat_name

SEED_BATCH = {True: 8, False: 64}
"""seed-convnet's batch for the in-process comparison: quick, full."""


def naive_server(threads: int) -> Child:
    return Child(
        [sys.executable, "-m", "bench._naive_server"],
        re.compile(r"naive serving on (\S+:\d+)"),
        thread_env(threads),
        timeout=120,
    )


def _seed_model(cfg: Config, section: Section, address: str, convnet: torch.nn.Module) -> None:
    """seed-convnet: gradtap vs in-process retain_grad() (what the seed does) and autograd.grad."""
    from gradtap.client import Client, Objective

    batch = SEED_BATCH[cfg.quick]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
    params = list(convnet.parameters())

    def retain_grad() -> None:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        xi = xt.detach().requires_grad_(True)
        logits, intermediate = convnet(xi)
        intermediate.retain_grad()
        torch.nn.functional.cross_entropy(logits, lt).backward()  # type: ignore[no-untyped-call]
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    def autograd_grad() -> None:
        xi = xt.detach().requires_grad_(True)
        logits, intermediate = convnet(xi)
        torch.autograd.grad(torch.nn.functional.cross_entropy(logits, lt), [intermediate, xi])

    with Client(address, timeout=600) as client:

        def gradtap() -> None:
            client.analyze(
                "seed-convnet",
                x,
                ["relu_1"],
                Objective.cross_entropy(labels.tolist()),
                input_grads=True,
                outputs=False,
            )

        series = interleaved(
            {"retain_grad": retain_grad, "autograd_grad": autograd_grad, "gradtap": gradtap},
            rounds=cfg.repeats,
            budget_s=cfg.budget_s,
            calls=5,
        )
    for p in params:
        p.requires_grad_(False)
    base = series["retain_grad"]
    label = f"seed-convnet batch {batch}, relu_1 + input gradients, cross_entropy"
    for key, text in (
        ("retain_grad", "in-process retain_grad() + backward() (the seed's way)"),
        ("autograd_grad", "in-process autograd.grad, no parameter grads"),
        ("gradtap", "gradtap analyze"),
    ):
        section.row(
            f"{label}: {text}",
            "ms",
            [t * 1e3 for t in series[key]],
            ratio=ratios(series[key], base),
            ratio_to="in-process retain_grad",
        )


def _attribute(
    client: Any, x: np.ndarray, labels: np.ndarray
) -> tuple[Callable[[], Any] | None, str]:
    """A Saliency call through Client.attribute, where this client version has it."""
    method = getattr(client, "attribute", None)
    if method is None:
        return None, "Client.attribute does not exist in this version"
    # attribute(model, inputs, method, *, index=None, ...), as in client/_calls.py
    return (lambda: method("seed-convnet", x, "saliency", index=labels.tolist()).attribution), ""


def _captum(cfg: Config, section: Section, address: str, convnet: torch.nn.Module) -> None:
    """Captum's Saliency on seed-convnet in-process vs the same through gradtap."""
    from gradtap.client import Client, Objective

    try:
        from captum.attr import Saliency
    except ImportError as e:
        section.unavailable("Captum Saliency in-process", f"captum is not installed ({e})")
        return
    batch = SEED_BATCH[cfg.quick]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 3, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
    saliency = Saliency(lambda inp: convnet(inp)[0])

    def captum() -> torch.Tensor:
        return saliency.attribute(xt.clone().requires_grad_(True), target=lt)  # type: ignore[no-any-return]

    with Client(address, timeout=600) as client:
        # gradtap without Attribute: Saliency is |d logit[label] / d input|.
        def via_analyze() -> np.ndarray:
            r = client.analyze(
                "seed-convnet",
                x,
                objective=Objective.logit(labels.tolist()),
                input_grads=True,
                outputs=False,
            )
            saliency_map: np.ndarray = np.abs(r.input_grads[0])
            return saliency_map

        reference = captum().numpy()
        error = float(np.max(np.abs(via_analyze() - reference)))
        variants: dict[str, Callable[[], Any]] = {"captum": captum, "analyze": via_analyze}
        attribute, why = _attribute(client, x, labels)
        attribute_error = None
        if attribute is not None:
            try:
                attribute_error = float(np.max(np.abs(np.asarray(attribute()) - reference)))
                variants["attribute"] = attribute
            except Exception as e:  # a client whose API differs is reported, not fatal
                why = f"Client.attribute failed: {type(e).__name__}: {e}"[:300]
        series = interleaved(variants, rounds=cfg.repeats, budget_s=cfg.budget_s, calls=5)
    base = series["captum"]
    label = f"Saliency on seed-convnet, batch {batch}"
    section.row(
        f"{label}: Captum in-process",
        "ms",
        [t * 1e3 for t in base],
        ratio=[1.0] * len(base),
        ratio_to="Captum in-process",
    )
    if "attribute" in series:
        section.row(
            f"{label}: gradtap Client.attribute",
            "ms",
            [t * 1e3 for t in series["attribute"]],
            ratio=ratios(series["attribute"], base),
            ratio_to="Captum in-process",
            max_abs_difference_vs_captum=attribute_error,
        )
    else:
        section.unavailable(f"{label}: gradtap Client.attribute", why)
    section.row(
        f"{label}: gradtap analyze(input_grad, logit objective) + np.abs",
        "ms",
        [t * 1e3 for t in series["analyze"]],
        ratio=ratios(series["analyze"], base),
        ratio_to="Captum in-process",
        max_abs_difference_vs_captum=error,
    )


def _naive(cfg: Config, section: Section, address: str) -> None:
    """One result in one unary message (raw bytes, or torch.save) vs gradtap's stream."""
    import grpc
    from gradtap.client import Client

    limit = (1 << 31) - 1
    peer = naive_server(cfg.threads)
    channel = grpc.insecure_channel(
        peer.match.group(1),
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
    )
    raw = channel.unary_unary("/naive.Tensors/Raw")
    saved = channel.unary_unary("/naive.Tensors/TorchSave")
    x = np.random.default_rng(0).standard_normal((1, REPEAT_WIDTH)).astype(np.float32)
    try:
        with Client(address, timeout=600) as client:
            for size in cfg.naive_bytes:
                request = struct.pack("<Q", size)
                rows = size // (4 * REPEAT_WIDTH)

                def naive_raw(request: bytes = request, rows: int = rows) -> np.ndarray:
                    data = raw(request, timeout=600)
                    return np.frombuffer(data, dtype=np.float32).reshape(rows, REPEAT_WIDTH)

                def naive_torch(request: bytes = request) -> np.ndarray:
                    data = saved(request, timeout=600)
                    loaded: torch.Tensor = torch.load(io.BytesIO(data), weights_only=True)
                    return loaded.numpy()

                def gradtap(size: int = size) -> np.ndarray:
                    out: np.ndarray = client.analyze(repeat_name(size), x, outputs=True).outputs[0]
                    return out

                for fn in (naive_raw, naive_torch, gradtap):
                    if fn().nbytes != size:
                        raise AssertionError(f"{fn.__name__} returned the wrong size")
                series = interleaved(
                    {"gradtap": gradtap, "raw": naive_raw, "torch_save": naive_torch},
                    rounds=cfg.repeats,
                    budget_s=cfg.budget_s,
                )
                # The naive server's peak memory for one raw call.
                before = proc_status(peer.pid)["VmRSS"]
                reset = reset_peak_rss(peer.pid)
                naive_raw()
                naive_peak = proc_status(peer.pid)["VmHWM"] - before if reset else None
                base = series["gradtap"]
                mib = f"{size / 2**20:.0f} MiB"
                for key, text in (
                    ("gradtap", "gradtap analyze (1 MiB chunks, assembled in place)"),
                    ("raw", "naive unary gRPC, raw bytes, np.frombuffer"),
                    ("torch_save", "naive unary gRPC, torch.save bytes, torch.load"),
                ):
                    extra: dict[str, Any] = {}
                    if key == "raw" and naive_peak is not None:
                        extra["server_peak_rss_rise_over_result"] = naive_peak / size
                    section.row(
                        f"{mib} result: {text}",
                        "GB/s",
                        [size / t / GB for t in series[key]],
                        ratio=ratios(base, series[key]),
                        ratio_to="gradtap throughput",
                        **extra,
                    )
    finally:
        channel.close()
        peer.stop()


def run(cfg: Config, address: str, convnet: torch.nn.Module) -> Section:
    section = Section("peers")
    for p in convnet.parameters():
        p.requires_grad_(False)
    _seed_model(cfg, section, address, convnet)
    _captum(cfg, section, address, convnet)
    _naive(cfg, section, address)
    section.notes.append(
        "Ratios of times (ms rows: < 1 is faster than the baseline) or of throughputs (GB/s "
        "rows: < 1 is slower than gradtap). The naive servers raise gRPC's message limit to "
        "2 GiB - 1 and answer a whole tensor in one message: `t.numpy().tobytes()`, or "
        "`torch.save` into a BytesIO (made per call, as such a server would)."
    )
    return section

"""Overhead: ResNet-18's layer and input gradients through gradtap vs the same in-process."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._common import Config, Section, interleaved, ratios, stats
from .models import RESNET_TARGETS, ResNet18

TARGET_RATIO = 1.05


def run(cfg: Config, address: str, module: ResNet18, model_name: str = "resnet18") -> Section:
    from gradtap.client import Client, Objective

    section = Section("overhead")
    batch, image = cfg.resnet_batch, cfg.resnet_image
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, image, image)).astype(np.float32)
    xt = torch.from_numpy(x)
    for p in module.parameters():
        p.requires_grad_(False)

    def autograd_grad() -> list[torch.Tensor]:
        """(a) The physical limit: one forward, autograd.grad on the taps and the input."""
        xi = xt.detach().requires_grad_(True)
        logits, taps = module.features(xi)
        return list(torch.autograd.grad(logits.sum(), [*taps, xi]))

    def retain_grad() -> list[torch.Tensor]:
        """(b) The seed's way: retain_grad() on the taps, backward() with parameter grads."""
        for p in module.parameters():
            p.requires_grad_(True)
            p.grad = None
        try:
            xi = xt.detach().requires_grad_(True)
            logits, taps = module.features(xi)
            for t in taps:
                t.retain_grad()
            logits.sum().backward()  # type: ignore[no-untyped-call]
            grads = [t.grad for t in taps] + [xi.grad]
            return [g for g in grads if g is not None]
        finally:
            for p in module.parameters():
                p.requires_grad_(False)
                p.grad = None

    with Client(address, timeout=600) as client:
        results: dict[str, Any] = {}

        def through_gradtap() -> None:
            results["r"] = client.analyze(
                model_name,
                x,
                list(RESNET_TARGETS),
                Objective.sum(),
                input_grads=True,
                outputs=False,
            )

        # The same numbers, or the comparison is meaningless.
        through_gradtap()
        reference = autograd_grad()
        r = results["r"]
        got = [r.gradients[t] for t in RESNET_TARGETS] + [r.input_grads[0]]
        errors = [
            float(np.max(np.abs(g - ref.numpy())) / (np.max(np.abs(ref.numpy())) or 1.0))
            for g, ref in zip(got, reference)
        ]
        section.info["max_relative_error_vs_in_process"] = max(errors)

        server_ms: list[float] = []

        def gradtap_timed() -> None:
            through_gradtap()
            server_ms.append(results["r"].metadata["timings"]["total_ms"])

        series = interleaved(
            {
                "in_process_autograd_grad": autograd_grad,
                "in_process_retain_grad": retain_grad,
                "gradtap": gradtap_timed,
            },
            rounds=cfg.repeats,
            budget_s=cfg.budget_s,
        )
    result_bytes = sum(a.nbytes for a in got)
    base = series["in_process_autograd_grad"]
    ms = {k: [v * 1e3 for v in vs] for k, vs in series.items()}
    section.row(
        "(a) in-process: forward + autograd.grad on taps and input (no parameter grads)",
        "ms",
        ms["in_process_autograd_grad"],
        ratio=[1.0] * len(base),
        ratio_to="(a)",
    )
    section.row(
        "(b) in-process: retain_grad() + backward() (all parameter grads)",
        "ms",
        ms["in_process_retain_grad"],
        ratio=ratios(series["in_process_retain_grad"], base),
        ratio_to="(a)",
    )
    gradtap_ratio = ratios(series["gradtap"], base)
    section.row(
        "gradtap end to end (subprocess server, loopback)",
        "ms",
        ms["gradtap"],
        ratio=gradtap_ratio,
        ratio_to="(a)",
        ratio_to_b=stats(ratios(series["gradtap"], series["in_process_retain_grad"])),
    )
    section.row("gradtap server's own time (timings.total_ms)", "ms", server_ms[1:] or server_ms)
    section.info.update(
        batch=batch,
        image=image,
        layers=list(RESNET_TARGETS),
        objective="sum of logits",
        result_bytes=result_bytes,
        torch_threads=cfg.threads,
    )
    measured = stats(gradtap_ratio)["median"]
    section.target(
        "gradtap / in-process autograd.grad (a)",
        f"<= {TARGET_RATIO}x",
        measured,
        measured <= TARGET_RATIO,
        "x",
    )
    vs_b = stats(ratios(series["gradtap"], series["in_process_retain_grad"]))["median"]
    section.target("gradtap / in-process retain_grad (b)", "< 1x (beat it)", vs_b, vs_b < 1.0, "x")
    section.notes.append(
        f"ResNet-18 at {image}x{image}, batch {batch}; gradients of {', '.join(RESNET_TARGETS)} "
        f"and the input ({result_bytes / 2**20:.1f} MiB), objective sum of logits; "
        f"max relative difference gradtap vs (a): {max(errors):.1e}."
    )
    return section

"""The language-model section: a token attribution (`attribute_tokens`) on a GPT-2-small-sized
model, end to end through a gradtap server, against the same computation in-process: Captum's
LLMGradientAttribution on the same Hugging Face module.

The model is bench/architectures.py's gpt2 at full size (12 layers, 768 wide, 12 heads, a
50,257-token vocabulary, random weights), exported by `gradtap export`'s code; `--quick`
keeps its width and vocabulary with 2 layers and a shorter prompt. Also runs alone:

    .venv/bin/python -m bench.language [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._common import Config, GradtapServer, Section, interleaved, ratios, stats

RTOL = 1e-4
"""Scores agree with Captum's within this fraction of the largest score."""
METHODS = ("input_x_gradient", "integrated_gradients")


@dataclass(frozen=True)
class Sizes:
    layers: int
    tokens: int
    """Prompt and continuation together."""
    continuation: int
    steps: int
    """Integration steps."""
    rounds: int


def sizes(cfg: Config) -> Sizes:
    if cfg.quick:
        return Sizes(layers=2, tokens=16, continuation=2, steps=2, rounds=cfg.repeats)
    return Sizes(layers=12, tokens=128, continuation=8, steps=8, rounds=min(cfg.repeats, 3))


def run(cfg: Config) -> Section:
    import torch
    from captum.attr import (
        LayerGradientXActivation,
        LayerIntegratedGradients,
        LLMGradientAttribution,
        TextTokenInput,
    )
    from gradtap.client import Client
    from gradtap.server.export import ExportOptions, export
    from gradtap.server.export.huggingface import hf_model

    from tests import language_models as lm

    from .architectures import ARCHITECTURES

    size = sizes(cfg)
    section = Section("language")
    gpt2 = next(a for a in ARCHITECTURES if a.key == "gpt2").ways[0]
    ids = np.random.default_rng(0).integers(0, lm.VOCABULARY, size.tokens).astype(np.int64)
    prompt, continuation = ids[: -size.continuation], ids[-size.continuation :]
    tokenizer = lm.word_tokenizer()
    with tempfile.TemporaryDirectory(prefix="gradtap-language-") as tmp:
        root, repository = Path(tmp, "config"), Path(tmp, "repository")
        repository.mkdir()
        source = gpt2.source("full", root, n_layer=size.layers)
        exported = export(source, ExportOptions(sequence=(2, size.tokens), batch=(1, 64)))
        (repository / "gpt2.pt2").write_bytes(exported.data)
        module = hf_model(Path(source.removeprefix("hf:")), seed=0)
        for p in module.parameters():
            p.requires_grad_(False)
        server = GradtapServer(cfg.threads, repository, builtins=False)
        rows: list[dict[str, Any]] = []
        try:
            with Client(server.address, timeout=3600) as client:
                for method in METHODS:
                    steps = size.steps if method == "integrated_gradients" else None

                    def served(method: str = method, steps: int | None = steps) -> Any:
                        return client.attribute_tokens(
                            "gpt2", prompt, continuation, method=method, n_steps=steps
                        )

                    def in_process(method: str = method, steps: int | None = steps) -> Any:
                        layer = module.transformer.wte
                        extra: dict[str, Any] = {}
                        if method == "integrated_gradients":
                            algorithm: Any = LayerIntegratedGradients(module, layer)
                            extra["n_steps"] = steps
                        else:
                            algorithm = LayerGradientXActivation(module, layer)
                        llm = LLMGradientAttribution(algorithm, tokenizer)
                        text = TextTokenInput(lm.text(prompt), tokenizer)
                        target = torch.from_numpy(continuation)
                        return llm.attribute(text, target=target, **extra)

                    # compared once, which also warms both sides; then timed in rounds
                    got, want = served(), in_process()
                    reference = want.token_attr.numpy()
                    error = float(np.abs(got.scores - reference).max() / np.abs(reference).max())
                    series = interleaved(
                        {"captum": in_process, "gradtap": served},
                        rounds=size.rounds,
                        budget_s=cfg.budget_s * 10,
                        warmup=0,
                    )
                    rows.append(
                        {
                            "method": method,
                            "series": series,
                            "error": error,
                            "passes": got.metadata.get("passes"),
                        }
                    )
                    print(f"  language: {method} done", file=sys.stderr)
        finally:
            server.stop()
    _report(section, size, rows)
    return section


def _report(section: Section, size: Sizes, rows: list[dict[str, Any]]) -> None:
    what = (
        f"GPT-2-small-sized ({size.layers} layers, 768 wide, vocabulary 50,257), "
        f"{size.tokens} tokens ({size.continuation} continuation)"
    )
    worst = 0.0
    for row in rows:
        s = row["series"]
        method = row["method"]
        label = method + (f", {size.steps} steps" if method == "integrated_gradients" else "")
        section.row(
            f"{what}: {label}: Captum LLMGradientAttribution, in-process (baseline)",
            "s",
            s["captum"],
            ratio=[1.0] * len(s["captum"]),
            ratio_to="Captum",
        )
        section.row(
            f"{what}: {label}: gradtap attribute_tokens end to end",
            "s",
            s["gradtap"],
            ratio=ratios(s["gradtap"], s["captum"]),
            ratio_to="Captum",
            max_relative_difference_vs_captum=row["error"],
            server_passes=row["passes"],
        )
        worst = max(worst, row["error"])
        section.info[method] = {
            "end_to_end_over_captum": stats(ratios(s["gradtap"], s["captum"]))["median"],
            "max_relative_difference": row["error"],
        }
    section.target(
        "token attribution: gradtap's scores vs Captum's (max |difference| / max |score|)",
        f"<= {RTOL:g}",
        worst,
        worst <= RTOL,
    )
    section.notes.append(
        "A token attribution of each continuation token's log-probability to each prompt "
        "token at the token embedding: `Client.attribute_tokens` against a server subprocess "
        "on loopback, and Captum's LLMGradientAttribution (LayerGradientXActivation, "
        "LayerIntegratedGradients) in this process on the same module, random weights, "
        "token ids 0..99; batch 1."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.language", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 layers, 16 tokens")
    parser.add_argument("--repeats", type=int, metavar="N", help="rounds per comparison")
    args = parser.parse_args(argv)
    from . import report

    section = run(Config.make(args.quick, args.repeats, None))
    print(report.tables({"sections": {"language": section.as_json()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

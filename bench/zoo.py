"""The zoo: real architectures from timm and Hugging Face beside the seed models, exported with
torch.export into a repository as a user would, with random weights (no downloads).

Each entry builds its module (eval mode, fixed seed) and batch-2 inputs, names the module paths
a caller would target, and says how eager PyTorch computes the same gradients in-process: a
forward hook on each target module and one `torch.autograd.grad` of the sum of the logits.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BATCH = 2


@dataclass(frozen=True)
class Entry:
    """One architecture of the zoo."""

    name: str
    """The served model's name."""
    family: str
    """Where it comes from: timm, huggingface or seed."""
    make: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    """The module (eval mode, seeded weights) and its batch-2 inputs."""
    targets: tuple[str, ...]
    """Module paths whose output gradients a call asks for."""
    about: str
    builtin: bool = False
    """Served by every gradtap server already (the seed models): not exported."""


@dataclass
class Built:
    """An entry made: the module, its inputs, and whether gradients reach the inputs."""

    entry: Entry
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]

    @property
    def float_inputs(self) -> bool:
        return all(t.is_floating_point() for t in self.inputs)


# -- timm without torchvision ----------------------------------------------------------------


class _Placeholder(type):
    """A class standing for any torchvision name timm mentions at import time."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d, the one torchvision class timm's layers use."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((num_features,), fill))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return FrozenBatchNorm2d if name == "FrozenBatchNorm2d" else _Placeholder(name, (), {})


class _AbsentTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `torchvision.*` as stand-in modules, so that timm's models import."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _AbsentModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def import_timm() -> Any:
    """timm, imported. timm imports torchvision at import time (datasets, transforms, one
    norm layer), and torchvision does not install beside this torch: where it is missing, its
    names are stand-ins (the bench builds no dataset or transform) and FrozenBatchNorm2d is
    torchvision's, written out above."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present but broken against this torch
        _forget_torchvision()
        finder = _AbsentTorchvision()
        sys.meta_path.insert(0, finder)
        try:
            import timm
        finally:
            # timm holds what it took; nothing else (transformers checks for torchvision)
            # may find the stand-ins
            sys.meta_path.remove(finder)
            _forget_torchvision()
        return timm
    import timm

    return timm


def _forget_torchvision() -> None:
    for key in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
        del sys.modules[key]


def available() -> dict[str, str]:
    """Which families can be built here: family -> "" when yes, else why not."""
    why: dict[str, str] = {"seed": ""}
    try:
        import_timm()
        why["timm"] = ""
    except Exception as e:  # noqa: BLE001
        why["timm"] = f"timm does not import ({type(e).__name__}: {e})"[:200]
    try:
        import transformers  # noqa: F401

        why["huggingface"] = ""
    except Exception as e:  # noqa: BLE001
        why["huggingface"] = f"transformers does not import ({type(e).__name__})"
    return why


# -- builders --------------------------------------------------------------------------------


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make().eval()


def _image(size: int, channels: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, channels, size, size, generator=g),)


def _tokens(length: int = 16, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, length), generator=torch.Generator().manual_seed(2))


def _timm(model: str, size: int, **kwargs: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def make() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        timm = import_timm()
        module = _seeded(lambda: timm.create_model(model, pretrained=False, **kwargs))
        return module, _image(size)

    return make


class Logits(nn.Module):
    """A Hugging Face model called as gradtap serves it: tensors in, the logits out
    (use_cache=False, return_dict=False)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs))
        out = self.model(**kwargs, use_cache=False, return_dict=False)
        return out[0]  # type: ignore[no-any-return]


def _hf(kind: str) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def make() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import transformers as tf

        ids = _tokens()
        if kind == "llama":
            config = tf.LlamaConfig(
                vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                use_cache=False,
            )  # fmt: skip
            model = _seeded(lambda: tf.LlamaForCausalLM(config))
            return Logits(model, ["input_ids"]).eval(), (ids,)
        if kind == "gpt2":
            config = tf.GPT2Config(
                vocab_size=1000, n_positions=64, n_embd=256, n_layer=4, n_head=4, use_cache=False
            )
            model = _seeded(lambda: tf.GPT2LMHeadModel(config))
            return Logits(model, ["input_ids"]).eval(), (ids,)
        if kind == "bert":
            config = tf.BertConfig(
                vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=1024, max_position_embeddings=64,
            )  # fmt: skip
            model = _seeded(lambda: tf.BertForMaskedLM(config))
            return BertLogits(model).eval(), (ids,)
        if kind == "whisper":
            config = tf.WhisperConfig(
                vocab_size=1000, num_mel_bins=80, encoder_layers=2, decoder_layers=2, d_model=192,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=768,
                decoder_ffn_dim=768, max_source_positions=64, max_target_positions=32,
                use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                decoder_start_token_id=1,
            )  # fmt: skip
            model = _seeded(lambda: tf.WhisperForConditionalGeneration(config))
            features = torch.randn(BATCH, 80, 128, generator=torch.Generator().manual_seed(3))
            return Logits(model, ["input_features", "decoder_input_ids"]).eval(), (features, ids)
        raise ValueError(kind)

    return make


class BertLogits(nn.Module):
    """BERT's masked-LM logits (BERT takes no use_cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, return_dict=False)[0]  # type: ignore[no-any-return]


def _seed(name: str, size: tuple[int, ...]) -> Callable[[], tuple[nn.Module, Any]]:
    def make() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        from gradtap.server.models.zoo import builtin_module

        g = torch.Generator().manual_seed(1)
        return builtin_module(name), (torch.randn(BATCH, *size, generator=g),)

    return make


ENTRIES: tuple[Entry, ...] = (
    Entry("timm-resnet50", "timm", _timm("resnet50", 64), ("layer2", "layer4"),
          "ResNet-50, 64x64"),
    Entry("timm-mobilenetv3", "timm", _timm("mobilenetv3_small_100", 128),
          ("blocks.2", "blocks.5"), "MobileNetV3-Small, 128x128"),
    Entry("timm-efficientnet_b0", "timm", _timm("efficientnet_b0", 96), ("blocks.3", "blocks.6"),
          "EfficientNet-B0, 96x96"),
    Entry("timm-convnext_atto", "timm", _timm("convnext_atto", 96), ("stages.1", "stages.3"),
          "ConvNeXt-Atto, 96x96"),
    Entry("timm-regnety_002", "timm", _timm("regnety_002", 160), ("s2", "s4"),
          "RegNetY-200MF, 160x160"),
    Entry("timm-levit_128s", "timm", _timm("levit_128s", 224), ("stages.0", "stages.2"),
          "LeViT-128S, 224x224"),
    Entry("timm-vit_tiny", "timm", _timm("vit_tiny_patch16_224", 112, img_size=112),
          ("blocks.5", "blocks.11"), "ViT-Tiny/16, 112x112"),
    Entry("timm-eva02_tiny", "timm", _timm("eva02_tiny_patch14_224", 112, img_size=112),
          ("blocks.5", "blocks.11"), "EVA-02-Tiny/14, 112x112"),
    Entry("hf-llama", "huggingface", _hf("llama"),
          ("model.model.embed_tokens", "model.model.layers.1", "model.model.norm"),
          "Llama-style decoder, 4 layers x 256, 16 tokens"),
    Entry("hf-gpt2", "huggingface", _hf("gpt2"),
          ("model.transformer.wte", "model.transformer.h.1", "model.transformer.ln_f"),
          "GPT-2-style decoder, 4 layers x 256, 16 tokens"),
    Entry("hf-bert", "huggingface", _hf("bert"),
          ("model.bert.embeddings", "model.bert.encoder.layer.1", "model.bert.encoder.layer.3"),
          "BERT-style encoder, 4 layers x 256, 16 tokens"),
    Entry("hf-whisper", "huggingface", _hf("whisper"),
          ("model.model.encoder.layers.1", "model.model.decoder.layers.1"),
          "Whisper-style encoder-decoder, 2+2 layers x 192, 128 frames, 16 tokens"),
    Entry("seed-convnet", "seed", _seed("seed-convnet", (3, 28, 28)), ("conv1", "conv2"),
          "the seed's MyModel, 28x28", builtin=True),
    Entry("seed-encoder", "seed", _seed("seed-encoder", (3, 28, 28)), ("encoder",),
          "the seed's conv encoder, 28x28", builtin=True),
    Entry("seed-mlp", "seed", _seed("seed-mlp", (784,)), ("fc1", "fc2"),
          "the seed's SimpleNet, 784 features", builtin=True),
)  # fmt: skip

QUICK = ("timm-regnety_002", "hf-llama", "seed-convnet")


def entries(quick: bool = False, only: Sequence[str] = ()) -> list[Entry]:
    """The zoo's entries that can be built here (all, or QUICK's, or those named)."""
    can = available()
    chosen = [e for e in ENTRIES if not can[e.family]]
    if only:
        chosen = [e for e in chosen if e.name in only]
    elif quick:
        chosen = [e for e in chosen if e.name in QUICK]
    return chosen


def build(entry: Entry) -> Built:
    module, inputs = entry.make()
    for p in module.parameters():
        p.requires_grad_(False)
    return Built(entry, module, inputs)


def export(built: Built, directory: Path) -> Path:
    """Writes the entry's archive into `directory` (batch 2, static shapes)."""
    program = torch.export.export(built.module, built.inputs)
    path = directory / f"{built.entry.name}.pt2"
    torch.export.save(program, path)
    return path


def eager(
    built: Built,
    device: torch.device | None = None,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[], list[torch.Tensor]]:
    """Eager PyTorch computing what gradtap is asked for, in-process: the targets' output
    gradients (and the inputs', when they are float) of the sum of the logits, by one
    forward with a hook on each target module and one `torch.autograd.grad` (of `loss` of the
    logits, when given).

    Where inputs are token ids, gradients reach the targets only through the weights, so the
    weights require gradients (as gradtap's engine makes them); none is computed.
    """
    module, inputs = built.module, built.inputs
    if device is not None:
        module = module.to(device)
        inputs = tuple(x.to(device) for x in inputs)
    through_weights = not built.float_inputs
    modules = dict(module.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def keep(m: nn.Module, args: Any, out: Any) -> None:
            captured[name] = out if isinstance(out, torch.Tensor) else out[0]

        return keep

    for name in built.entry.targets:
        modules[name].register_forward_hook(hook(name))

    for p in module.parameters():
        p.requires_grad_(through_weights)

    def run() -> list[torch.Tensor]:
        captured.clear()
        xs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        with torch.enable_grad():
            out = module(*xs)
            logits = out if isinstance(out, torch.Tensor) else out[0]
            wrt = [captured[t] for t in built.entry.targets]
            wrt += [x for x in xs if x.is_floating_point()]
            scalar = logits.sum() if loss is None else loss(logits)
            return list(torch.autograd.grad(scalar, wrt))

    return run

"""The zoo: the real architectures of bench/architectures.py at their bench size, exported by
`gradtap export`'s own code as a user would (random weights, no downloads), beside the seed
models gradtap serves built in.

Each entry names the module paths a call targets and says how eager PyTorch computes the same
gradients in-process: a forward hook on each target module and one `torch.autograd.grad` of
the sum of output 0 (the logits).
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import ARCHITECTURES, Architecture, Way, chosen

BATCH = 2
"""The rows of every input (`gradtap export`'s example batch)."""
SIZE = "bench"


@dataclass(frozen=True)
class Entry:
    """One model of the zoo."""

    name: str
    """The served model's name."""
    family: str
    """Where it comes from: torchvision, timm, huggingface or seed."""
    targets: tuple[str, ...]
    """Module paths whose output gradients a call asks for."""
    about: str
    architecture: Architecture | None = None
    way: Way | None = None
    """How it is built here (an architecture's first way that can be)."""
    builtin: bool = False
    """Served by every gradtap server already (the seed models): not exported."""


@dataclass
class Built:
    """An entry made: the module, how it is called, its inputs as gradtap takes them, and the
    archive (none for a seed model)."""

    entry: Entry
    module: nn.Module
    arguments: dict[str, Any]
    """The module's keyword arguments: the inputs, and those fixed at export (use_cache)."""
    inputs: tuple[torch.Tensor, ...]
    """The model's inputs, in the order the archive takes them."""
    archive: bytes = b""

    @property
    def float_inputs(self) -> bool:
        return all(t.is_floating_point() for t in self.inputs)

    def forward(self) -> torch.Tensor:
        """Output 0 of the module on the inputs (no gradients)."""
        with torch.no_grad():
            return first_output(self.module(**self.arguments))


def first_output(out: Any) -> torch.Tensor:
    """Output 0 of what a module returned: a tensor, a tuple's first or a ModelOutput's first
    field (the logits)."""
    return out if isinstance(out, torch.Tensor) else out[0]


SEEDS = (
    Entry("seed-convnet", "seed", ("conv1", "conv2"), "the seed's MyModel, 28x28", builtin=True),
    Entry("seed-encoder", "seed", ("encoder",), "the seed's conv encoder, 28x28", builtin=True),
    Entry("seed-mlp", "seed", ("fc1", "fc2"), "the seed's SimpleNet, 784 features", builtin=True),
)
_SEED_INPUTS = {"seed-convnet": (3, 28, 28), "seed-encoder": (3, 28, 28), "seed-mlp": (784,)}

QUICK = ("regnety_002", "llama", "seed-convnet")


def _entry(architecture: Architecture, way: Way) -> Entry:
    about = way.label() + (f" ({way.about})" if way.about else "")
    image = architecture.image.get(SIZE)
    if image and way.library != "transformers":
        about += f", {image[1]}x{image[2]}"
    if way.library == "transformers":
        about += _layout(way.config[SIZE])
    return Entry(
        architecture.key,
        architecture.family,
        architecture.targets_of(way),
        about,
        architecture,
        way,
    )


def _layout(config: Any) -> str:
    """ ", 4 layers x 256, 8 tokens": a Hugging Face configuration's depth and width."""
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    if layers is None and "encoder_layers" in config:
        layers = f"{config['encoder_layers']}+{config.get('decoder_layers', 0)}"
    width = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    tokens = ", 8 tokens" if config.get("vocab_size") else ""
    return f", {layers} layers x {width}{tokens}" if layers and width else ""


def _chosen(quick: bool, only: Sequence[str]) -> list[Architecture | Entry]:
    found: list[Architecture | Entry] = [a for a in ARCHITECTURES if a.bench]
    found += SEEDS
    if only:
        return [e for e in found if _key(e) in only]
    if quick:
        return [e for e in found if _key(e) in QUICK]
    return found


def _key(item: Architecture | Entry) -> str:
    return item.key if isinstance(item, Architecture) else item.name


def entries(quick: bool = False, only: Sequence[str] = ()) -> list[Entry]:
    """The zoo's entries that can be built here (all, or QUICK's, or those named)."""
    found = []
    for item in _chosen(quick, only):
        if isinstance(item, Entry):
            found.append(item)
            continue
        way, _ = chosen(item, SIZE)
        if way is not None:
            found.append(_entry(item, way))
    return found


def unavailable(quick: bool = False, only: Sequence[str] = ()) -> dict[str, str]:
    """The zoo's models that cannot be built here, and why not."""
    why = {}
    for item in _chosen(quick, only):
        if isinstance(item, Architecture):
            way, reasons = chosen(item, SIZE)
            if way is None:
                why[f"{item.key} ({item.name})"] = "; ".join(reasons)
    return why


def build(entry: Entry) -> Built:
    """Builds the entry: a seed model from gradtap's zoo, else by `gradtap export`'s code."""
    if entry.builtin:
        from gradtap.server.models.zoo import builtin_module

        module = builtin_module(entry.name)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, *_SEED_INPUTS[entry.name], generator=g)
        parameter = next(iter(inspect.signature(module.forward).parameters))
        built = Built(entry, module, {parameter: x}, (x,))
    else:
        from gradtap.server.export import ExportOptions, export

        assert entry.architecture is not None and entry.way is not None
        image = entry.architecture.image.get(SIZE) if entry.way.library != "transformers" else None
        with tempfile.TemporaryDirectory(prefix="gradtap-zoo-") as root:
            result = export(entry.way.source(SIZE, Path(root)), ExportOptions(input_shape=image))
        inputs = tuple(result.inputs[spec.name] for spec in result.model.inputs)
        built = Built(entry, result.module, dict(result.inputs), inputs, result.data)
    for p in built.module.parameters():
        p.requires_grad_(False)
    return built


def export(built: Built, directory: Path) -> Path:
    """Writes the entry's archive into `directory`."""
    path = directory / f"{built.entry.name}.pt2"
    path.write_bytes(built.archive)
    return path


def eager(
    built: Built,
    device: torch.device | None = None,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[], list[torch.Tensor]]:
    """Eager PyTorch computing what gradtap is asked for, in-process: the targets' output
    gradients (and the inputs', when they are float) of the sum of output 0, by one forward
    with a hook on each target module and one `torch.autograd.grad` (of `loss` of output 0,
    when given).

    Where inputs are token ids, gradients reach the targets only through the weights, so the
    weights require gradients (as gradtap's engine makes them); none is computed.
    """
    module, arguments = built.module, built.arguments
    if device is not None:
        module = module.to(device)
        arguments = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in arguments.items()
        }
    through_weights = not built.float_inputs
    modules = dict(module.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def keep(m: nn.Module, args: Any, out: Any) -> None:
            captured[name] = first_output(out)

        return keep

    for name in built.entry.targets:
        modules[name].register_forward_hook(hook(name))

    for p in module.parameters():
        p.requires_grad_(through_weights)

    def run() -> list[torch.Tensor]:
        captured.clear()
        xs = {
            k: v.detach().requires_grad_(v.is_floating_point())
            if isinstance(v, torch.Tensor)
            else v
            for k, v in arguments.items()
        }
        with torch.enable_grad():
            logits = first_output(module(**xs))
            wrt = [captured[t] for t in built.entry.targets]
            wrt += [x for x in xs.values() if isinstance(x, torch.Tensor) and x.is_floating_point()]
            scalar = logits.sum() if loss is None else loss(logits)
            return list(torch.autograd.grad(scalar, wrt))

    return run

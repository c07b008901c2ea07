"""From a source to checked archive bytes: build the module, export it with dynamic
dimensions, load the archive in gradtap's own safe loader and compare what it serves with
what the original module computes."""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..engine.analysis import Analysis, Engine
from ..errors import InvalidArgument, ModelLoadError
from ..models.archive import OPTIONS_FILE, read_archive
from ..models.model import Model, dtype_name, prepare, shape_text
from ..models.padding import padding_of
from .huggingface import hf_source
from .source import ExportError, ExportOptions, Source
from .vision import factory_source, timm_source, torchvision_source

__all__ = ["ExportError", "ExportOptions", "Exported", "export", "parse_source"]


@dataclass
class Exported:
    """Checked archive bytes and what the check found."""

    data: bytes
    model: Model
    """The archive as gradtap serves it."""
    module: nn.Module
    """The module that was exported (for a causal language model, with its mask-following
    forward), to compare with."""
    inputs: dict[str, Any]
    """The example inputs it was exported with, by name."""
    max_abs_diff: float
    """The largest |served - original| over every output of every checked input."""
    worst_ratio: float
    """The largest |served - original| / (atol + rtol * |original|): at most 1 passes."""
    checked: int
    """How many inputs were compared."""
    description: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def signature(self) -> list[list[str]]:
        """One row per input and output: kind, name, dtype and shape in the user's words."""
        return [
            [kind, spec.name, dtype_name(spec.dtype), shape_text(spec.dims)]
            for kind, specs in (("input", self.model.inputs), ("output", self.model.outputs))
            for spec in specs
        ]


def parse_source(text: str) -> tuple[str, str]:
    """SOURCE -> (kind, rest): hf:DIR, timm:NAME, torchvision:NAME, python:MODULE:FACTORY."""
    kind, colon, rest = text.partition(":")
    kinds = ("hf", "timm", "torchvision", "python")
    if not colon or kind not in kinds or not rest:
        raise ExportError(
            f"SOURCE {text!r} is not one of hf:DIRECTORY, timm:NAME, torchvision:NAME, "
            "python:MODULE:FACTORY"
        )
    return kind, rest


def _source(text: str, options: ExportOptions) -> Source:
    kind, rest = parse_source(text)
    if kind == "hf":
        return hf_source(rest, options)
    if kind == "timm":
        return timm_source(rest, options)
    if kind == "torchvision":
        return torchvision_source(rest, options)
    return factory_source(rest, options)


def export(source: str, options: ExportOptions | None = None) -> Exported:
    """Exports SOURCE (see parse_source) and checks the archive; raises ExportError naming
    the cause when torch cannot export the model or the archive does not reproduce it."""
    options = options or ExportOptions()
    started = time.perf_counter()

    def progress(message: str) -> None:
        options.progress(f"[{time.perf_counter() - started:6.1f}s] {message}")

    progress(f"loading {source}")
    built = _source(source, options)
    built.module.eval()
    progress(f"exporting {built.description or source} with torch.export")
    program = _exported(built)
    symbols = _dim_symbols(program, built)
    extra = dict(built.extra_files)
    extra[OPTIONS_FILE] = json.dumps({"dims": symbols, **built.options})
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra)
    data = buffer.getvalue()
    progress("loading the archive in gradtap's safe loader")
    try:
        archive = read_archive(data)
        model = prepare(
            "export",
            "export",
            archive.program,
            torch.device("cpu"),
            dims=archive.options.get("dims"),
            renamed=archive.renamed,
        )
        model.padding = padding_of(model, archive.options)
    except ModelLoadError as e:
        raise ExportError(f"gradtap's loader refuses the exported archive: {e}") from e
    progress(f"comparing what it serves with the module, on {1 + len(built.checks)} inputs")
    worst_abs, worst_ratio = 0.0, 0.0
    for inputs in [built.inputs, *built.checks]:
        a, r = _compare(built.module, model, inputs, options)
        worst_abs, worst_ratio = max(worst_abs, a), max(worst_ratio, r)
    checked = 1 + len(built.checks)
    if built.padded_check:
        a, r = _padded_check(model, built.inputs, options)
        worst_abs, worst_ratio = max(worst_abs, a), max(worst_ratio, r)
        checked += 1
    if not worst_ratio <= 1.0:
        raise ExportError(
            f"the exported archive does not reproduce the module: outputs differ by up to "
            f"{worst_abs:.3g} (tolerance atol {options.atol:g} + rtol {options.rtol:g} x |value|)"
        )
    notes = [f"{n.name}: {n.note}" for n in model.nodes.values() if n.note]
    progress(f"matches the original module: max |difference| {worst_abs:.3g} over {checked} inputs")
    return Exported(
        data=data,
        model=model,
        module=built.module,
        inputs=built.inputs,
        max_abs_diff=worst_abs,
        worst_ratio=worst_ratio,
        checked=checked,
        description=built.description,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _exported(built: Source) -> torch.export.ExportedProgram:
    dynamic: dict[str, Any] = {
        name: built.dims.get(name) if isinstance(value, torch.Tensor) else None
        for name, value in built.inputs.items()
    }
    try:
        with torch.no_grad():
            return torch.export.export(
                built.module, (), dict(built.inputs), dynamic_shapes=dynamic, strict=False
            )
    except Exception as e:  # torch's reasons are many; its message names the cause
        raise ExportError(f"torch could not export the model: {_first_lines(e)}") from e


def _first_lines(error: BaseException, limit: int = 1200) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def _dim_symbols(program: torch.export.ExportedProgram, built: Source) -> dict[str, str]:
    """The symbol torch gave each named dynamic dimension: {"s77": "batch", ...}."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    symbols: dict[str, str] = {}
    for name, dims in built.dims.items():
        node = placeholders.get(name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor):
            continue
        for d, dim in dims.items():
            size = value.shape[d]
            if not isinstance(size, int) and size.node.expr.is_Symbol:
                symbols.setdefault(str(size.node.expr), dim.__name__)
    return symbols


def _served(model: Model, inputs: dict[str, Any]) -> list[torch.Tensor]:
    by_name = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    missing = [spec.name for spec in model.inputs if spec.name not in by_name]
    if missing:
        raise ExportError(f"the archive takes inputs the export did not name: {missing}")
    tensors = [by_name[spec.name] for spec in model.inputs]
    try:
        model.check_inputs(tensors)
    except InvalidArgument as e:
        raise ExportError(f"the archive refuses the check's inputs: {e.message}") from e
    outcome = Engine(torch.device("cpu")).analyze(model, Analysis(inputs=tensors, outputs=True))
    return [c.tensor for c in outcome.tensors]


def _original(module: nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(**inputs)
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def _difference(
    got: torch.Tensor, want: torch.Tensor, options: ExportOptions
) -> tuple[float, float]:
    if got.numel() == 0:
        return 0.0, 0.0
    diff = (got.double() - want.double()).abs()
    ratio = diff / (options.atol + options.rtol * want.double().abs())
    return float(diff.max()), float(ratio.max())


def _compare(
    module: nn.Module, model: Model, inputs: dict[str, Any], options: ExportOptions
) -> tuple[float, float]:
    served = _served(model, inputs)
    original = _original(module, inputs)
    if len(served) != len(original):
        raise ExportError(
            f"the archive serves {len(served)} outputs, the module returns {len(original)}"
        )
    worst = (0.0, 0.0)
    for spec, got, want in zip(model.outputs, served, original):
        if tuple(got.shape) != tuple(want.shape):
            raise ExportError(
                f"output {spec.name} has shape {list(got.shape)} served, {list(want.shape)} "
                f"in the module (shape {shape_text(spec.dims)})"
            )
        a, r = _difference(got, want, options)
        worst = (max(worst[0], a), max(worst[1], r if math.isfinite(r) else math.inf))
    return worst


def _padded_check(
    model: Model, inputs: dict[str, Any], options: ExportOptions
) -> tuple[float, float]:
    """A causal language model's left-padded row gives, at its tokens, what it gives alone."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    length = ids.shape[1]
    shortest = model.inputs[0].dims[1].min
    pad = min(max(1, length // 2), length - shortest)
    if pad < 1:  # the sequence's range leaves no room for padding
        return 0.0, 0.0
    alone = {"input_ids": ids[:1, pad:], "attention_mask": mask[:1, pad:]}
    padded_mask = mask[:1].clone()
    padded_mask[:, :pad] = 0
    padded = {"input_ids": ids[:1], "attention_mask": padded_mask}
    got = _served(model, padded)[0][:, pad:]
    want = _served(model, alone)[0]
    return _difference(got, want, options)

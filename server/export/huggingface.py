"""Hugging Face sources: a local model directory (weights and config), or a directory holding
only a config.json (random weights, seeded). Text encoders, causal language models,
encoder-decoders, vision and speech models, told apart by their config and main input."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.padding import Padding
from .source import ExportError, ExportOptions, Source, clamp

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
"""Files of a directory's tokenizer that the archive carries in its extra files."""

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

EXAMPLE_BATCH, EXAMPLE_LENGTH = 2, 8
"""The size of the input a model is exported with (within the ranges asked for)."""
CHECK_BATCH, CHECK_LENGTH = 3, 5
"""The size of the further input the check compares on."""


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the directory is local
    try:
        import transformers
    except ImportError as e:
        raise ExportError("hf: sources need transformers (pip install transformers)") from e
    return transformers


def hf_model(directory: Path, seed: int) -> nn.Module:
    """The directory's model: its weights when it has them, else random weights (seeded)
    from its config.json. The class is the config's first architecture (BertModel,
    GPT2LMHeadModel...), else AutoModel's choice."""
    transformers = _transformers()
    if not (directory / "config.json").is_file():
        raise ExportError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:
        raise ExportError(f"transformers cannot read {directory}/config.json: {e}") from e
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    weights = any((directory / name).is_file() for name in _WEIGHTS)
    try:
        if weights:
            loader = cls or transformers.AutoModel
            model = loader.from_pretrained(directory, local_files_only=True)
        else:
            torch.manual_seed(seed)
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as e:
        raise ExportError(f"transformers cannot build the model of {directory}: {e}") from e
    model.eval()
    return model  # type: ignore[no-any-return]


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _max_positions(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _ids(vocab: int, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=generator)


def _is_causal(model: nn.Module, config: Any) -> bool:
    name = type(model).__name__
    return bool(getattr(config, "is_decoder", False)) or name.endswith(
        ("ForCausalLM", "LMHeadModel")
    )


def _with_position_ids(model: nn.Module, fixed: dict[str, Any]) -> nn.Module:
    """The causal language model, its forward taking (input_ids, attention_mask) and deriving
    position ids from the mask, so that a left-padded row gives what it gives alone. The
    module is the model itself (its forward replaced on the instance), so module paths stay
    those of the model."""
    original = model.forward

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return original(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **fixed,
        )

    model.forward = forward  # type: ignore[method-assign]
    return model


def hf_source(text: str, options: ExportOptions) -> Source:
    """The Source of hf:DIRECTORY."""
    directory = Path(text).expanduser()
    if not directory.is_dir():
        raise ExportError(f"hf:{text}: no such directory")
    model = hf_model(directory, options.seed)
    config: Any = model.config
    generator = torch.Generator().manual_seed(options.seed)
    batch = torch.export.Dim("batch", min=options.batch[0], max=options.batch[1])
    main = getattr(model, "main_input_name", "input_ids")
    fixed = {"use_cache": False} if _accepts(model, "use_cache") else {}
    extra = {
        name: (directory / name).read_text()
        for name in TOKENIZER_FILES
        if (directory / name).is_file()
    }
    kind = type(model).__name__
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))

    def sequence_dim(name: str, *limits: str) -> torch.export.Dim:
        low, high = options.sequence or (2, _max_positions(config, *limits) or 512)
        return torch.export.Dim(name, min=low, max=high)

    def length(dim: torch.export.Dim, wanted: int) -> int:
        return clamp(wanted, (dim.min, dim.max))

    rows, check_rows = options.rows(EXAMPLE_BATCH), options.rows(CHECK_BATCH)

    if main == "pixel_values":
        shape = options.input_shape or _image_shape(config)
        pixels = torch.randn((rows, *shape), generator=generator)
        source = Source(
            module=model,
            inputs={"pixel_values": pixels},
            dims={"pixel_values": {0: batch}},
            checks=[{"pixel_values": torch.randn((check_rows, *shape), generator=generator)}],
            description=f"{kind} (vision, input {tuple(shape)})",
        )
    elif main == "input_features":
        bins = getattr(config, "num_mel_bins", 80)
        frames = 2 * (_max_positions(config, "max_source_positions") or 1500)
        shape = options.input_shape or (bins, frames)
        vocab = config.vocab_size
        decoder = sequence_dim("decoder_sequence", "max_target_positions")
        inputs: dict[str, Any] = {
            "input_features": torch.randn((rows, *shape), generator=generator),
            "decoder_input_ids": _ids(vocab, rows, length(decoder, EXAMPLE_LENGTH), generator),
            **fixed,
        }
        source = Source(
            module=model,
            inputs=inputs,
            dims={"input_features": {0: batch}, "decoder_input_ids": {0: batch, 1: decoder}},
            checks=[
                {
                    "input_features": torch.randn((check_rows, *shape), generator=generator),
                    "decoder_input_ids": _ids(
                        vocab, check_rows, length(decoder, CHECK_LENGTH), generator
                    ),
                    **fixed,
                }
            ],
            description=f"{kind} (speech, input {tuple(shape)})",
        )
    elif main == "input_ids":
        vocab = config.vocab_size
        sequence = sequence_dim(
            "sequence", "max_position_embeddings", "n_positions", "max_source_positions"
        )

        decoder = sequence_dim("decoder_sequence", "n_positions", "max_target_positions")

        def text_inputs(count: int, wanted: int) -> dict[str, Any]:
            size = length(sequence, wanted)
            mask = torch.ones(count, size, dtype=torch.long)
            mask[-1, : size // 3] = 0  # one left-padded row
            found: dict[str, Any] = {
                "input_ids": _ids(vocab, count, size, generator),
                "attention_mask": mask,
            }
            if encoder_decoder:
                found["decoder_input_ids"] = _ids(
                    vocab, count, length(decoder, wanted - 2), generator
                )
            return found

        dims: dict[str, dict[int, torch.export.Dim]] = {
            "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: sequence},
        }
        if encoder_decoder:
            dims["decoder_input_ids"] = {0: batch, 1: decoder}
        causal = not encoder_decoder and _is_causal(model, config)
        if causal:
            if not _accepts(model, "position_ids"):
                raise ExportError(f"{kind} takes no position_ids: cannot follow the mask")
            module = _with_position_ids(model, fixed)
            padding = Padding("attention_mask", "left", _pad_token_id(config))
            source = Source(
                module=module,
                inputs=text_inputs(rows, EXAMPLE_LENGTH),
                dims=dims,
                checks=[text_inputs(check_rows, CHECK_LENGTH)],
                description=f"{kind} (causal language model, position ids from the mask)",
                padded_check=True,
                options={"padding": padding.as_options()},
            )
        else:
            what = "encoder-decoder" if encoder_decoder else "text encoder"
            source = Source(
                module=model,
                inputs={**text_inputs(rows, EXAMPLE_LENGTH), **fixed},
                dims=dims,
                checks=[{**text_inputs(check_rows, CHECK_LENGTH), **fixed}],
                description=f"{kind} ({what})",
            )
            if not encoder_decoder:  # position ids count from the first position: pad right
                padding = Padding("attention_mask", "right", _pad_token_id(config))
                source.options = {"padding": padding.as_options()}
    else:
        raise ExportError(
            f"{kind} takes {main!r} first: gradtap export knows text (input_ids), "
            "vision (pixel_values) and speech (input_features) models"
        )
    source.extra_files = extra
    return source


def _pad_token_id(config: Any) -> int:
    """The config's padding token (its end-of-text token where it has none, as GPT-2), else
    0: padded positions are masked out, so any id in the vocabulary gives the same results."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < vocab:
            return value
    return 0


def _image_shape(config: Any) -> tuple[int, ...]:
    channels = getattr(config, "num_channels", 3)
    size = getattr(config, "image_size", 224)
    if isinstance(size, (list, tuple)):
        return (channels, int(size[0]), int(size[-1]))
    return (channels, int(size), int(size))

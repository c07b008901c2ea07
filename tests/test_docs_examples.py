"""The Python examples of the feature guides run as written against the session's server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ["reductions.md", "batch-jobs.md", "plots.md"]
DOCUMENTED_ADDRESS = "127.0.0.1:50051"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


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

"""`make gpu-check` (bench/gpu_check.py): on a machine without CUDA it skips cleanly, writing
nothing; its report replaces the GPU section of the performance page and keeps the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import GPU_HEADING, markdown, write_section

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_it_says_so_writes_nothing_and_succeeds(tmp_path: Path) -> None:
    docs, results = tmp_path / "performance.md", tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--write-docs", "--docs", str(docs),
         "--json", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "skipped: torch sees no CUDA device" in done.stdout
    assert not docs.exists() and not results.exists()


def test_make_gpu_check_runs_the_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "gpu-check: install" in makefile
    assert "-m bench.gpu_check --write-docs" in makefile


def test_the_gpu_section_names_the_device_and_replaces_the_last_one(tmp_path: Path) -> None:
    results = {
        "device": "NVIDIA Example 80GB",
        "torch": "2.13.0",
        "wall_s": 300,
        "tests": {"returncode": 0, "summary": "13 passed in 20.0s"},
        "sections": {
            "zoo": {
                "rows": [],
                "targets": [
                    {"name": "zoo x", "goal": "<= 1.1x", "measured": 1.02, "unit": "x", "met": True}
                ],
                "notes": [],
                "info": {},
            }
        },
    }
    text = markdown(results)
    assert text.startswith(GPU_HEADING) and "NVIDIA Example 80GB" in text
    assert "| zoo | zoo x | <= 1.1x | 1.02 x | **yes** |" in text
    docs = tmp_path / "performance.md"
    docs.write_text(f"# Performance\n\nCPU figures.\n\n{GPU_HEADING}\n\nold GPU figures\n")
    write_section(docs, text)
    written = docs.read_text()
    assert "CPU figures." in written and "old GPU figures" not in written
    assert written.count(GPU_HEADING) == 1 and "NVIDIA Example 80GB" in written

"""The soak script runs end to end on a tiny configuration and reports what it measured.

No memory target is asserted here: one short run's RSS is noise. What is checked is that the
script ran its traffic against a real server subprocess, wrote every figure, and that the
server answered no request with INTERNAL or another undocumented status.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak")
    command = [
        sys.executable, "bench/soak.py", "--requests", "200", "--max-seconds", "60",
        "--json", str(out / "soak.json"), "--write-docs", "--docs", str(out / "reliability.md"),
        "--heavy-seconds", "0",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    parsed: dict[str, Any] = json.loads((out / "soak.json").read_text())
    parsed["_docs"] = (out / "reliability.md").read_text()
    return parsed


def test_the_soak_served_every_request_without_a_server_error(results: dict[str, Any]) -> None:
    assert results["requests"] == 200 and results["stopped_by"] == "count"
    assert sum(results["codes"].values()) == 200
    assert results["internal"] == 0 and results["bug_count"] == 0, results["bugs"]
    assert results["codes"].get("OK", 0) > 0
    assert results["codes"].get("INVALID_ARGUMENT", 0) > 0
    assert results["after"] == {"server_alive": True, "serving": True, "same_numbers": True}


def test_the_soak_reports_memory_threads_and_throughput(results: dict[str, Any]) -> None:
    memory = results["memory"]
    for phase in ("start", "after_warmup", "end"):
        assert memory[phase]["rss_bytes"] > 0 and memory[phase]["threads"] > 0
    assert [s["requests"] for s in memory["samples"]] == sorted(
        s["requests"] for s in memory["samples"]
    )
    assert memory["samples"][-1]["requests"] == 200
    assert isinstance(results["rss_growth_after_warmup_pct"], float)
    assert isinstance(results["target"]["met"], bool)
    assert results["throughput_rps"] > 0 and results["seconds"] > 0
    for key in ("nproc", "memory_gib", "python", "torch", "grpcio", "date"):
        assert key in results["machine"]


def test_the_docs_page_names_the_command_the_target_and_the_machine(
    results: dict[str, Any],
) -> None:
    docs = results["_docs"]
    assert "bench/soak.py --requests 200 --max-seconds 60" in docs
    assert "less than 5%" in docs and results["machine"]["torch"] in docs
    assert f"| nproc | {results['machine']['nproc']} |" in docs

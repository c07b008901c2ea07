"""The benchmark suite runs end to end on a tiny configuration and reports every section.

No timing is asserted: the numbers depend on the machine. What is checked is that every
benchmark ran, measured something and wrote it where tooling and the docs expect it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench._common import quantile, stats

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "overhead", "zoo", "language", "small_calls", "transport", "batching", "peers", "memory",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "bench", "--quick", "--repeats", "1",
        "--json", str(out / "bench.json"), "--write-docs", "--docs", str(out / "performance.md"),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-6000:]
    results = json.loads((out / "bench.json").read_text())
    return results, (out / "performance.md").read_text(), done.stdout


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.parametrize("name", SECTIONS)
def test_every_section_ran_and_measured_numbers(
    run: tuple[dict[str, Any], str, str], name: str
) -> None:
    section = run[0]["sections"][name]
    assert "error" not in section, section.get("error")
    measured = [row for row in section["rows"] if row["status"] == "ok"]
    assert measured, f"{name} measured nothing"
    for row in measured:
        assert row["unit"], row
        for key in ("median", "min", "max"):
            assert _number(row[key]), (row["name"], key, row[key])
        assert row["min"] <= row["max"], row
        if "ratio" in row:
            assert all(_number(row["ratio"][k]) for k in ("median", "min", "max")), row
    for row in section["rows"]:
        if row["status"] != "ok":
            assert row["status"] == "not available" and row["why"], row
    assert section["targets"] or name == "peers", f"{name} reports no target"
    for target in section["targets"]:
        if target["measured"] is None:  # only a feature this server lacks goes unmeasured
            assert name == "batching" and target["met"] is None, target
        else:
            assert _number(target["measured"]) and isinstance(target["met"], bool), target


def test_baselines_are_measured_in_the_same_run_as_what_they_judge(
    run: tuple[dict[str, Any], str, str],
) -> None:
    sections = run[0]["sections"]
    names = {n: [row["name"] for row in s["rows"]] for n, s in sections.items()}
    assert any("autograd.grad" in n for n in names["overhead"])
    assert any("retain_grad" in n for n in names["overhead"])
    assert any("health Check" in n for n in names["small_calls"])
    assert any("plain TCP socket" in n for n in names["transport"])
    assert any("np.copy" in n for n in names["transport"])
    assert any("shared memory" in n for n in names["transport"])
    assert any("in-process sequential" in n for n in names["batching"])
    assert any("Captum" in n for n in names["peers"])
    assert any("naive unary gRPC, raw bytes" in n for n in names["peers"])
    assert any("torch.save" in n for n in names["peers"])
    assert any("eager autograd.grad" in n for n in names["zoo"])
    assert any("--compute-threads 0" in n for n in names["zoo"])
    # gradtap's gradients in the overhead benchmark are the in-process ones
    assert sections["overhead"]["info"]["max_relative_error_vs_in_process"] < 1e-4


def test_the_zoo_holds_real_architectures_whose_gradtap_gradients_are_eager_ones(
    run: tuple[dict[str, Any], str, str],
) -> None:
    zoo = run[0]["sections"]["zoo"]
    table = zoo["info"]["table"]
    assert {t["family"] for t in table} >= {"seed"}
    for t in table:
        assert t["max_relative_error"] < 1e-3, t
        assert t["switches_per_call"] >= 0 and t["faults_per_call"] >= 0, t
    assert "| model | eager | engine in-process | end to end |" in run[1]


def test_the_language_section_times_a_token_attribution_against_captum_on_gpt2(
    run: tuple[dict[str, Any], str, str],
) -> None:
    language = run[0]["sections"]["language"]
    names = [row["name"] for row in language["rows"]]
    for method in ("input_x_gradient", "integrated_gradients"):
        assert any(method in n and "Captum LLMGradientAttribution" in n for n in names)
        served = next(
            r for r in language["rows"] if method in r["name"] and "attribute_tokens" in r["name"]
        )
        assert served["ratio"]["to"] == "Captum"
        assert served["max_relative_difference_vs_captum"] <= 1e-4
    assert all("vocabulary 50,257" in n for n in names)


def test_machine_and_command_are_recorded(run: tuple[dict[str, Any], str, str]) -> None:
    results = run[0]
    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["memory_gib"] > 0
    for key in ("cpu_model", "python", "torch", "grpcio", "date"):
        assert machine[key], key
    assert "-m bench --quick --repeats 1" in results["command"]
    assert results["config"]["threads"] >= 1


def test_markdown_report_has_the_machine_and_a_table_per_section(
    run: tuple[dict[str, Any], str, str],
) -> None:
    _, docs, stdout = run
    assert "| nproc |" in docs and "| CPU |" in docs and "-m bench --quick" in docs
    for name in SECTIONS:
        assert f"### {name}" in docs and f"### {name}" in stdout
    assert docs.count("| measurement | median | spread (min – max) |") == len(SECTIONS)


def test_an_unknown_section_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "overhead,nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown section(s) nope" in done.stderr


def test_stats_give_the_median_and_spread() -> None:
    s = stats([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (2.5, 1.0, 4.0, 1.75, 3.25)
    assert quantile([5.0], 0.99) == 5.0
    assert math.isnan(quantile([], 0.5))


def test_stages_line_up_both_sides_marks_call_by_call() -> None:
    from bench._stages import STEPS, stages

    names = ["c0", "c1", "s0", "s1", "s2", "s3", "s4", "s5", "s6", "c3", "c4"]
    client, server = [], []
    for call in range(3):
        for k, name in enumerate(names):
            (client if name.startswith("c") else server).append((name, call * 1000 + k * 10))
    server.append(("s0", 5000))  # a health check between calls: outside every call
    steps = stages(server, client)
    assert steps["calls"] == 3 and steps["total"] == 0.1  # 100 ns, in microseconds
    assert all(steps[name] == 0.01 for name in STEPS)

"""docs/operations.md's Limits table names every limit flag of `gradtap serve`, with the
default the CLI has."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from gradtap.cli.serve import serve

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
LIMITS = {"stall_seconds", "memory_budget", "grace"}
"""Limit flags whose names do not start with max_."""


def limits_section() -> str:
    text = OPERATIONS.read_text()
    return text.split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]


def limit_flags() -> dict[str, object]:
    """Every limit flag of `gradtap serve` and its default."""
    return {
        "--" + name.replace("_", "-"): parameter.default
        for name, parameter in inspect.signature(serve).parameters.items()
        if name.startswith("max_") or name in LIMITS
    }


def test_every_limit_flag_is_in_the_table() -> None:
    section = limits_section()
    flags = limit_flags()
    assert {"--max-concurrent-requests", "--stall-seconds", "--max-archive-bytes"} <= set(flags)
    missing = [flag for flag in flags if not re.search(rf"^\| `{flag}[ `]", section, re.M)]
    assert not missing, f"docs/operations.md#limits lacks {missing}"


def test_the_table_gives_the_clis_numeric_defaults() -> None:
    section = limits_section()
    for flag, default in limit_flags().items():
        if not isinstance(default, (int, float)) or isinstance(default, bool):
            continue
        row = next(line for line in section.splitlines() if line.startswith(f"| `{flag}"))
        shown = row.split("|")[2].strip()
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
            if shown.endswith(unit):
                assert float(shown[: -len(unit)]) * size == default, (flag, shown, default)
                break
        else:
            assert float(shown) == default, (flag, shown, default)

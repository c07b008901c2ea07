"""Static checks that run with the suite: mypy (strict) over server/, client/ and gradtap/cli/,
and ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_server_and_client_type_check_under_strict_mypy() -> None:
    targets = ["server", "client", "gradtap/cli"]
    result = subprocess.run([str(BIN / "mypy"), *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_is_clean_under_ruff() -> None:
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "server", "client", "gradtap", "tests", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""Set-up: `make install` installs exactly what the lock files say and changes no tracked file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_make_install_uses_npm_ci_which_never_rewrites_the_lock_file() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "npm ci" in makefile and "npm install" not in makefile


def test_the_node_lock_file_is_complete_for_npm_ci() -> None:
    # npm ci refuses a lock file that misses a package package.json implies (buf's optional
    # platform binaries, say), where npm install would add them and leave the clone dirty.
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not on PATH")
    done = subprocess.run(
        [npm, "ci", "--dry-run", "--offline", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=ROOT / "tools",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_checks_that_make_install_leaves_the_checkout_clean() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "git status --porcelain" in script
    assert script.index("make install") < script.index("make test")

"""docs/errors.md names every reason the server can send."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def server_reasons() -> set[str]:
    reasons: set[str] = set()
    for path in (ROOT / "server").rglob("*.py"):
        text = path.read_text()
        reasons |= set(re.findall(r'reason="([A-Z][A-Z0-9_]*)"', text))
        # Reasons kept in constants, e.g. OVERLOADED = "SERVER_OVERLOADED".
        reasons |= set(re.findall(r'^[A-Z_]+ = "([A-Z][A-Z0-9_]*)"$', text, flags=re.MULTILINE))
    return reasons


def test_every_reason_is_documented() -> None:
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (ROOT / "docs" / "errors.md").read_text()))
    reasons = server_reasons()
    assert {"MODEL_NOT_FOUND", "SERVER_OVERLOADED", "CALL_TOO_LONG", "MISSING_TOKEN"} <= reasons
    assert reasons - documented == set()

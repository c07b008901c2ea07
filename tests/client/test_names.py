"""The client's documentation names only things that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "client"
DOTTED = re.compile(r"\bgradtap\.client((?:\.[A-Za-z_]\w*)+)")


def resolve(dotted: str) -> object:
    """The object a dotted name gradtap.client.X.Y names, through modules and attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for attribute in parts[end:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


@pytest.mark.parametrize("path", sorted(CLIENT.glob("*.py")), ids=lambda p: p.name)
def test_every_gradtap_client_name_in_the_client_exists(path: Path) -> None:
    for match in DOTTED.finditer(path.read_text()):
        name = "gradtap.client" + match.group(1)
        try:
            resolve(name)
        except (ImportError, AttributeError):
            pytest.fail(f"{path.name} names {name}, which does not exist")

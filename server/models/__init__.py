"""Models: safe loading of archives, what a model is (and the questions asked of it), the
built-in zoo, versions, the registry that loads, serves and lets go of them, and the
repository it reads and watches. The bottom layer with torch: it imports only
server/errors.py."""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    # gradtap.server.models was one module until 0.1; docs showed `builtin_module` there.
    if name in ("builtin_module", "export_builtin", "BUILTINS"):
        warnings.warn(
            f"gradtap.server.models.{name} moved to gradtap.server.models.zoo.{name}; "
            "the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from . import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

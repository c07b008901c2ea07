"""gradtap.server: loads models and serves gradients over gRPC; torch lives here and only here.

One sub-package per layer, each importing only those below it: errors.py (the domain
exceptions), models/ (archives, the model, the zoo, the registry), engine/ (pure torch),
wire/ (protobuf to the engine's objects and back) and rpc/ (the only code that imports grpc).

The public face is `Settings`, `start`, `create_server` and `serve` (from rpc/app.py). They
are loaded on first use, so that importing a lower layer never imports the ones above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rpc.app import Settings, create_server, serve, start

__all__ = ["Settings", "create_server", "serve", "start"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .rpc import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

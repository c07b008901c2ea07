"""Deprecated: the server process moved to gradtap.server.rpc.app. Import `Settings`, `start`,
`create_server` and `serve` from gradtap.server instead. This module goes in the next release."""

from __future__ import annotations

import warnings

from .rpc.app import (
    CONNECTION_AGE_MS,
    SERVICE_NAME,
    Running,
    Settings,
    create_server,
    resolve_device,
    serve,
    start,
)

__all__ = [
    "CONNECTION_AGE_MS",
    "SERVICE_NAME",
    "Running",
    "Settings",
    "create_server",
    "resolve_device",
    "serve",
    "start",
]

warnings.warn(
    "gradtap.server.app is deprecated and goes in the next release: import Settings, start, "
    "create_server and serve from gradtap.server",
    DeprecationWarning,
    stacklevel=2,
)

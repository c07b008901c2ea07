"""gradtap.server's public face, and gradtap.server.app, which still works for one release."""

from __future__ import annotations

import importlib
import subprocess
import sys

import gradtap.server
import pytest
from gradtap.server.rpc import app


def test_the_package_exports_the_server_process() -> None:
    assert sorted(gradtap.server.__all__) == ["Settings", "create_server", "serve", "start"]
    for name in gradtap.server.__all__:
        assert getattr(gradtap.server, name) is getattr(app, name)
    with pytest.raises(AttributeError):
        gradtap.server.Engine  # noqa: B018 - the face holds the four names only


def test_importing_a_lower_layer_loads_nothing_above_it() -> None:
    code = (
        "import sys, gradtap.server.engine.analysis, gradtap.server.models.zoo\n"
        "assert 'grpc' not in sys.modules, 'grpc'\n"
        "assert not any(m.startswith('gradtap.server.rpc') for m in sys.modules), 'rpc'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_old_app_module_still_works_and_warns() -> None:
    sys.modules.pop("gradtap.server.app", None)
    with pytest.warns(DeprecationWarning, match=r"gradtap\.server\.app is deprecated"):
        old = importlib.import_module("gradtap.server.app")
    for name in ("Settings", "Running", "start", "create_server", "serve", "resolve_device"):
        assert getattr(old, name) is getattr(app, name)


def test_the_zoo_at_its_old_path_still_works_and_warns() -> None:
    import gradtap.server.models
    from gradtap.server.models import zoo

    with pytest.warns(DeprecationWarning, match=r"moved to gradtap\.server\.models\.zoo"):
        old = gradtap.server.models.builtin_module
    assert old is zoo.builtin_module
    with pytest.raises(AttributeError):
        gradtap.server.models.nothing_here  # noqa: B018

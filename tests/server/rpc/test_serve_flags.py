"""`gradtap serve`'s production flags reach the server's Settings unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gradtap.server import Settings
from gradtap.server.rpc import app as server_app
from typer.testing import CliRunner

from gradtap import cli


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Settings]]:
    calls: list[tuple[str, Settings]] = []
    monkeypatch.setattr(
        server_app, "serve", lambda address, settings: calls.append((address, settings))
    )
    return calls


def test_every_flag_maps_onto_its_setting(
    served: list[tuple[str, Settings]], tmp_path: Path
) -> None:
    files = {name: tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem", "tokens")}
    for path in files.values():
        path.write_text("x\n")
    result = CliRunner().invoke(
        cli.app,
        [
            "serve", "--port", "0", "--device", "cpu",
            "--max-concurrent-requests", "3", "--max-queue", "7", "--max-call-seconds", "12.5",
            "--tls-cert", str(files["cert.pem"]), "--tls-key", str(files["key.pem"]),
            "--tls-client-ca", str(files["ca.pem"]), "--auth-token-file", str(files["tokens"]),
            "--metrics-port", "9091", "--shared-memory", "--compute-threads", "3",
            "--stall-seconds", "2.5", "--max-archive-bytes", "12345", "--memory-budget", "3GiB",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ((address, settings),) = served
    assert address == "127.0.0.1:0"
    assert settings.max_concurrent_requests == 3
    assert settings.max_queue == 7
    assert settings.max_call_seconds == 12.5
    assert settings.tls_cert == files["cert.pem"]
    assert settings.tls_key == files["key.pem"]
    assert settings.tls_client_ca == files["ca.pem"]
    assert settings.auth_token_file == files["tokens"]
    assert settings.metrics_port == 9091
    assert settings.shared_memory is True
    assert settings.compute_threads == 3
    assert settings.stall_seconds == 2.5
    assert settings.max_archive_bytes == 12345
    assert settings.memory_budget == "3GiB"


def test_the_defaults_are_the_settings_defaults(served: list[tuple[str, Settings]]) -> None:
    result = CliRunner().invoke(cli.app, ["serve", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ((_, settings),) = served
    defaults = Settings()
    names = ("max_concurrent_requests", "max_queue", "max_call_seconds", "metrics_port")
    names += ("stall_seconds", "max_archive_bytes")
    for name in (*names, "shared_memory", "compute_threads", "memory_budget"):
        assert getattr(settings, name) == getattr(defaults, name), name


@pytest.mark.parametrize(
    "args",
    [
        ["--max-call-seconds", "0"],
        ["--stall-seconds", "0"],
        ["--max-archive-bytes", "0"],
        ["--max-concurrent-requests", "0"],
        ["--max-queue", "-1"],
        ["--compute-threads", "-1"],
        ["--tls-cert", "/does/not/exist.pem"],
        ["--memory-budget", "lots"],
        ["--memory-budget", "0%"],
    ],
)
def test_impossible_values_are_usage_errors(
    served: list[tuple[str, Settings]], args: list[str]
) -> None:
    result = CliRunner().invoke(cli.app, ["serve", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert not served


def test_serve_caps_how_long_idle_openmp_threads_spin_unless_told(
    served: list[tuple[str, Settings]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert CliRunner().invoke(cli.app, ["serve", "--device", "cpu"]).exit_code == 0
    assert os.environ["GOMP_SPINCOUNT"] == "30000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert CliRunner().invoke(cli.app, ["serve", "--device", "cpu"]).exit_code == 0
    assert os.environ["GOMP_SPINCOUNT"] == "1000"

"""The contract: generated code in sync with the proto, clean under buf lint, versions agreeing."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"
GENERATED = [
    f"{name}{suffix}"
    for name in ("gradtap_pb2", "gradtap_pb2_grpc", "model_service_pb2", "model_service_pb2_grpc")
    for suffix in (".py", ".pyi")
]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "gradtap" / "v1" / name).read_text()
        committed = (ROOT / "gradtap" / "v1" / name).read_text()
        assert fresh == committed, f"gradtap/v1/{name} is stale: run `make proto`"


def _buf() -> str:
    if BUF.exists():
        return str(BUF)
    found = shutil.which("buf")
    if found is None:
        pytest.skip("buf is not installed (make install fetches it with npm)")
    return found


def test_proto_is_clean_under_buf_standard_lint() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_message_field_and_value_is_commented() -> None:
    config = '{"version":"v2","modules":[{"path":"proto"}],"lint":{"use":["COMMENTS"]}}'
    result = subprocess.run(
        [_buf(), "lint", "--config", config], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grpc_packages_agree_on_one_version() -> None:
    names = [
        "grpcio",
        "grpcio-tools",
        "grpcio-status",
        "grpcio-health-checking",
        "grpcio-reflection",
    ]
    versions = {name: importlib.metadata.version(name) for name in names}
    assert len(set(versions.values())) == 1, versions
    from gradtap.v1 import gradtap_pb2_grpc

    assert gradtap_pb2_grpc.GRPC_GENERATED_VERSION == versions["grpcio"]


def test_importing_the_client_does_not_import_torch() -> None:
    code = (
        "import sys, gradtap.client, gradtap.client.aio, gradtap.v1.gradtap_pb2; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

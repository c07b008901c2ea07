"""A Node.js client written from docs/protocol.md gets the same bytes as the Python client."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gradtap.client import Client, Objective

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "node" / "analyze.js"
GRPC_JS = ROOT / "tools" / "node_modules" / "@grpc" / "grpc-js"

# The wire dtypes this test reads back; tests/node/analyze.js knows them all.
DTYPES = {"DTYPE_FLOAT32": np.dtype("<f4"), "DTYPE_FLOAT64": np.dtype("<f8")}


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("node is not on PATH; the cross-language client test needs Node.js")
    if not GRPC_JS.is_dir():
        pytest.skip("tools/node_modules/@grpc/grpc-js is missing: run make install")
    return found


def run_script(
    node: str, tmp_path: Path, address: str, model: str, x: np.ndarray, target: str, objective: str
) -> subprocess.CompletedProcess[str]:
    x.astype("<f4").tofile(tmp_path / "input.bin")
    shape = ",".join(str(d) for d in x.shape)
    command = [node, str(SCRIPT), address, model, str(tmp_path / "input.bin"), shape, target]
    command += [objective, str(tmp_path / "result.json")]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def analyze_with_node(
    node: str, tmp_path: Path, address: str, model: str, x: np.ndarray, target: str, objective: str
) -> tuple[dict[str, Any], dict[tuple[str, str, int], np.ndarray]]:
    """The script's JSON description, and its tensors keyed by (role, name, index)."""
    done = run_script(node, tmp_path, address, model, x, target, objective)
    assert done.returncode == 0, done.stderr
    description = json.loads((tmp_path / "result.json").read_text())
    tensors = {}
    for t in description["tensors"]:
        array = np.fromfile(tmp_path / t["file"], dtype=DTYPES[t["dtype"]])
        assert array.nbytes == t["byte_size"]
        tensors[(t["role"], t["name"], t["index"])] = array.reshape(t["shape"])
    return description, tensors


def test_node_client_reassembles_a_one_message_result_byte_for_byte(
    node: str, tmp_path: Path, address: str, client: Client
) -> None:
    x = np.random.default_rng(7).standard_normal((1, 3, 28, 28), dtype=np.float32)
    description, tensors = analyze_with_node(
        node, tmp_path, address, "seed-convnet", x, "relu_1", "cross_entropy:3"
    )
    expected = client.analyze(
        "seed-convnet", x, ["relu_1"], Objective.cross_entropy([3]), input_grads=True
    )

    np.testing.assert_array_equal(
        tensors[("TENSOR_ROLE_GRADIENT", "relu_1", 0)], expected.gradients["relu_1"]
    )
    np.testing.assert_array_equal(
        tensors[("TENSOR_ROLE_INPUT_GRADIENT", "", 0)], expected.input_grads[0]
    )
    assert tensors[("TENSOR_ROLE_GRADIENT", "relu_1", 0)].shape == (1, 64, 24, 24)
    assert description["summary"]["loss"] == expected.loss
    assert description["summary"]["tensor_count"] == len(description["tensors"])
    # A result this small (about 300 KB) travels as one message: header, chunks, summary.
    assert description["stream"]["messages"] == 1


def test_node_client_reassembles_a_multi_chunk_result_over_4_mib(
    node: str, tmp_path: Path, address: str, client: Client
) -> None:
    x = np.random.default_rng(8).standard_normal((1, 3, 128, 128), dtype=np.float32)
    description, tensors = analyze_with_node(node, tmp_path, address, "wide", x, "conv", "sum")
    expected = client.analyze("wide", x, ["conv"], Objective.sum(), input_grads=True)

    gradient = tensors[("TENSOR_ROLE_GRADIENT", "conv", 0)]
    assert gradient.shape == (1, 96, 128, 128)
    assert gradient.nbytes > 4 << 20
    np.testing.assert_array_equal(gradient, expected.gradients["conv"])
    np.testing.assert_array_equal(
        tensors[("TENSOR_ROLE_INPUT_GRADIENT", "", 0)], expected.input_grads[0]
    )
    np.testing.assert_array_equal(tensors[("TENSOR_ROLE_OUTPUT", "", 0)], expected.outputs[0])
    # Chunks of at most 1 MiB of tensor bytes per message.
    total = sum(t["byte_size"] for t in description["tensors"])
    assert description["stream"]["messages"] >= total / (1 << 20)


def test_node_client_exits_nonzero_with_not_found_for_an_unknown_model(
    node: str, tmp_path: Path, address: str
) -> None:
    x = np.zeros((1, 3, 28, 28), dtype=np.float32)
    done = run_script(node, tmp_path, address, "no-such-model", x, "relu_1", "sum")
    assert done.returncode != 0
    assert "NOT_FOUND (code 5)" in done.stderr, done.stderr
    assert "MODEL_NOT_FOUND" in done.stderr, done.stderr
    assert not (tmp_path / "result.json").exists()

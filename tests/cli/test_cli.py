"""The gradtap CLI, run as a real subprocess against the session's server."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradtap.client import Client, Objective

from .running import RTOL, gradtap, image


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import gradtap.cli, sys; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "command",
    [
        "",
        "serve",
        "models",
        "describe",
        "analyze",
        "analyze-many",
        "health",
        "attribute",
        "perturb",
    ],
)
def test_every_subcommand_has_help(command: str) -> None:
    result = gradtap(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: gradtap {command}".rstrip() in result.stdout


def test_models_lists_each_version_with_state_source_and_digest(address: str) -> None:
    result = gradtap("models", "--address", address)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "VERSION", "STATE", "SOURCE", "DIGEST", "REASON"]
    lines = {line.split()[0]: line.split()[1:] for line in rows}
    with Client(address) as client:
        served = {m.name: m for m in client.list_models()}
    for name in ("seed-encoder", "seed-convnet", "seed-mlp"):
        assert lines[name] == ["1*", "READY", "builtin", served[name].digest]


def test_models_json_matches_the_client(address: str) -> None:
    result = gradtap("models", "--json", "--address", address)
    assert result.returncode == 0, result.stderr
    with Client(address) as client:
        expected = [dataclasses.asdict(m) for m in client.list_models()]
    assert json.loads(result.stdout) == json.loads(json.dumps(expected))
    assert {"default_version", "versions", "state", "reason"} <= set(expected[0])


def test_address_comes_from_the_environment(address: str) -> None:
    result = gradtap("models", GRADTAP_ADDRESS=address)
    assert result.returncode == 0, result.stderr
    assert "seed-convnet" in result.stdout


def test_describe_shows_nodes_modules_and_dynamic_dimensions(address: str) -> None:
    result = gradtap("describe", "seed-convnet", "--address", address)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "relu_1" in out and "aten.relu.default" in out
    assert any(line.split()[:3] == ["conv2", "->", "conv2d_1"] for line in out.splitlines())
    assert "(batch, 3, 28, 28)" in out and "(batch, 64, 24, 24)" in out
    assert "batch 1..4096" in out


def test_describe_json_keeps_dynamic_dimensions_as_null(address: str) -> None:
    result = gradtap("describe", "seed-convnet", "--json", "--address", address)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["inputs"][0]["shape"] == [None, 3, 28, 28]
    assert described["modules"]["conv2"] == "conv2d_1"
    assert "relu_1" in [n["name"] for n in described["nodes"]]


def test_analyze_saves_the_same_gradients_as_the_client(address: str, tmp_path: Path) -> None:
    x = image(11)
    np.save(tmp_path / "x.npy", x)
    result = gradtap(
        "analyze", "seed-convnet", "--input", "x.npy", "--target", "relu_1",
        "--objective", "cross_entropy:3", "--input-grads", "--out", "r.npz",
        "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Client(address) as client:
        expected = client.analyze(
            "seed-convnet",
            x,
            targets=["relu_1"],
            objective=Objective.cross_entropy([3]),
            input_grads=True,
        )
    with np.load(tmp_path / "r.npz") as saved:
        assert sorted(saved.files) == [
            "gradient/relu_1", "input_grad/0", "loss", "output/0", "output/1",
        ]  # fmt: skip
        np.testing.assert_allclose(saved["gradient/relu_1"], expected.gradients["relu_1"], RTOL)
        np.testing.assert_allclose(saved["input_grad/0"], expected.input_grads[0], RTOL)
        np.testing.assert_allclose(saved["output/0"], expected.outputs[0], RTOL)
        np.testing.assert_allclose(saved["loss"], expected.loss, RTOL)
    rows = {tuple(line.split()[:2]): line for line in result.stdout.splitlines()}
    assert "(1, 64, 24, 24)" in rows["gradient", "relu_1"]
    assert "(1, 3, 28, 28)" in rows["input_grad", "0"]
    assert f"{expected.loss:.6g}" in result.stdout


def test_analyze_without_input_uses_the_documented_seeded_random_input(
    address: str, tmp_path: Path
) -> None:
    result = gradtap(
        "analyze", "seed-convnet", "--target", "relu_1", "--input-seed", "7", "--out", "r.npz",
        "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "relu_1" in result.stdout
    assert "random" in result.stderr and "using sum" in result.stderr
    x = np.random.default_rng(7).standard_normal((1, 3, 28, 28)).astype(np.float32)
    with Client(address) as client:
        expected = client.analyze("seed-convnet", x, ["relu_1"], Objective.sum())
    with np.load(tmp_path / "r.npz") as saved:
        np.testing.assert_allclose(saved["gradient/relu_1"], expected.gradients["relu_1"], RTOL)


def test_analyze_casts_a_float64_input_to_float32_and_says_so(address: str, tmp_path: Path) -> None:
    x = np.random.default_rng(12).standard_normal((3, 784))
    np.save(tmp_path / "x.npy", x)
    result = gradtap(
        "analyze", "seed-mlp", "--input", "x.npy", "--target", "relu_1",
        "--objective", "logit:2,0,9", "--activations", "--out", "r.npz",
        "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "cast float64 to float32" in result.stderr
    with Client(address) as client:
        expected = client.analyze(
            "seed-mlp",
            x.astype(np.float32),
            ["relu_1"],
            Objective.logit([2, 0, 9]),
            activations=True,
        )
    with np.load(tmp_path / "r.npz") as saved:
        np.testing.assert_allclose(saved["gradient/relu_1"], expected.gradients["relu_1"], RTOL)
        np.testing.assert_allclose(saved["activation/relu_1"], expected.activations["relu_1"], RTOL)


def test_analyze_never_casts_an_integer_input_to_float(address: str, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 784), dtype=np.int64))
    result = gradtap("analyze", "seed-mlp", "--input", "x.npy", "--address", address, cwd=tmp_path)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "inputs[0].dtype" in result.stderr
    assert "cast" not in result.stderr


def test_analyze_mse_objective_at_a_node_matches_the_client(address: str, tmp_path: Path) -> None:
    x = np.random.default_rng(13).standard_normal((2, 784)).astype(np.float32)
    target = np.zeros((2, 64), np.float32)
    target[:, 10] = 1
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", target)
    result = gradtap(
        "analyze", "seed-mlp", "-i", "x.npy", "-t", "relu_1", "--objective", "mse:t.npy",
        "--objective-node", "relu_1", "--input-grads", "--out", "r.npz",
        "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mse at node relu_1" in result.stdout
    with Client(address) as client:
        expected = client.analyze(
            "seed-mlp", x, ["relu_1"], Objective.mse(target, node="relu_1"), input_grads=True
        )
    with np.load(tmp_path / "r.npz") as saved:
        np.testing.assert_allclose(saved["input_grad/0"], expected.input_grads[0], RTOL)
        np.testing.assert_allclose(saved["loss"], expected.loss, RTOL)


def test_unknown_target_is_invalid_argument_naming_the_field(address: str) -> None:
    result = gradtap("analyze", "seed-convnet", "--target", "nope", "--address", address)
    assert result.returncode == 1
    assert "error: INVALID_ARGUMENT" in result.stderr
    assert "field: targets[0].name" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_is_not_found(address: str) -> None:
    result = gradtap("analyze", "no-such-model", "--address", address)
    assert result.returncode == 1
    assert "error: NOT_FOUND" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "spec",
    ["", "bogus", "logit", "logit:", "logit:a", "cross_entropy:1,x", "sum:3", "mse:missing.npy"],
)
def test_malformed_objective_spec_is_a_usage_error(address: str, spec: str) -> None:
    result = gradtap("analyze", "seed-convnet", "--objective", spec, "--address", address)
    assert result.returncode == 2
    assert "Invalid value for '--objective'" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_of_the_fixture_is_serving(address: str) -> None:
    result = gradtap("health", "--address", address)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


def test_health_of_an_unreachable_server_exits_1_with_the_error() -> None:
    result = gradtap("health", "--address", "127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1
    assert "error: UNAVAILABLE" in result.stderr or "error: DEADLINE_EXCEEDED" in result.stderr


def test_serve_without_torch_asks_for_the_server_extra() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; "
        "sys.argv = ['gradtap', 'serve', '--port', '0']; "
        "from gradtap.cli import main; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert 'pip install "gradtap[server]"' in result.stderr


def test_serve_refuses_a_missing_model_repository(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = gradtap("serve", "--port", "0", "--model-repository", str(missing))
    assert result.returncode == 2
    assert "--model-repository" in result.stderr and "does not exist" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_on_cuda_without_cuda_is_a_readable_error() -> None:
    result = gradtap("serve", "--port", "0", "--device", "cuda")
    assert result.returncode == 2
    assert "error: --device cuda" in result.stderr
    assert "Traceback" not in result.stderr


CLIENT_COMMANDS = [
    "models",
    "describe",
    "analyze",
    "analyze-many",
    "health",
    "attribute",
    "perturb",
]


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
def test_every_client_command_has_the_same_options_and_default_timeout(command: str) -> None:
    result = gradtap(command, "--help", COLUMNS="200")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("\nOptions:", 1)[1]
    for option in ("--address", "--token", "--timeout"):
        assert option in options
    assert "[default: 300.0" in options.split("--timeout", 1)[1].split("\n  -")[0]
    calls_a_model = command not in ("models", "health")
    assert ("--digest" in options) == calls_a_model
    analyzes = command in ("analyze", "analyze-many")
    assert ("--precision" in options) == analyzes and ("--param-grads" in options) == analyzes
    sends_inputs = command in ("analyze", "attribute", "perturb")
    assert ("--input-seed" in options) == sends_inputs and ("--out " in options) == sends_inputs


def test_analyze_param_grads_precision_and_digest_reach_the_call(
    address: str, tmp_path: Path
) -> None:
    with Client(address) as client:
        digest = client.describe("seed-convnet").digest
        x = image(5)
        expected = client.analyze(
            "seed-convnet",
            x,
            [],
            Objective.logit(1),
            param_grads=["fc.bias", "conv1.weight"],
            precision="bfloat16",
            digest=digest,
        )
    np.save(tmp_path / "x.npy", x)
    result = gradtap(
        "analyze", "seed-convnet", "-i", "x.npy", "--objective", "logit:1",
        "--param-grads", "fc.bias", "--param-grads", "conv1.weight", "--precision", "bfloat16",
        "--digest", digest, "--out", "r.npz", "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "r.npz") as saved:
        for name in ("fc.bias", "conv1.weight"):
            np.testing.assert_allclose(saved[f"param_grad/{name}"], expected.param_grads[name])
        assert float(saved["loss"]) == expected.loss


def test_the_0_1_spellings_of_analyze_still_work_with_a_note(address: str, tmp_path: Path) -> None:
    old = gradtap(
        "analyze", "seed-convnet", "-t", "relu_1", "--input-grad", "--seed", "3",
        "--out", "old.npz", "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert old.returncode == 0, old.stderr
    assert "note: --input-grad is deprecated; use --input-grads" in old.stderr
    assert "note: --seed in analyze is deprecated; use --input-seed" in old.stderr
    new = gradtap(
        "analyze", "seed-convnet", "-t", "relu_1", "--input-grads", "--input-seed", "3",
        "--out", "new.npz", "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert new.returncode == 0 and "deprecated" not in new.stderr, new.stderr
    with np.load(tmp_path / "old.npz") as a, np.load(tmp_path / "new.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])

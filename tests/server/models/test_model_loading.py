"""Hostile model archives are refused before torch would execute anything they carry."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective
from gradtap.server import Settings, start
from gradtap.server.errors import ModelLoadError
from gradtap.server.models.archive import load_archive
from gradtap.server.models.registry import Registry
from gradtap.server.models.zoo import export_builtin

from ... import models


class _OpensFile:
    """Unpickling this creates the file it names: the canary for code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("good")
    module = models.build(models.ResBlock)
    program = torch.export.export(module, (torch.zeros(2, 3, 16, 16),))
    torch.export.save(program, directory / "m.pt2")
    return (directory / "m.pt2").read_bytes()


def rewrite(data: bytes, edit: Callable[[str, bytes], bytes]) -> bytes:
    """A copy of a zip archive with every member passed through `edit(name, payload)`."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, edit(info.filename, source.read(info.filename)))
    return out.getvalue()


def edit_json(suffix: str, change: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:  # type: ignore[type-arg]
    def edit(name: str, payload: bytes) -> bytes:
        if not name.endswith(suffix):
            return payload
        document = json.loads(payload)
        change(document)
        return json.dumps(document).encode()

    return edit


def test_a_plain_archive_loads_and_runs(archive: bytes) -> None:
    program = load_archive(archive)
    assert any(n.name == "conv2d" for n in program.graph.nodes)


def test_pickled_sample_inputs_are_never_unpickled(archive: bytes, tmp_path: Path) -> None:
    canary = tmp_path / "executed"
    payload = pickle.dumps(_OpensFile(canary))
    hostile = rewrite(archive, lambda n, p: payload if "sample_inputs" in n else p)
    load_archive(hostile)
    assert not canary.exists()
    # The canary is live: torch.export.load alone falls back to a full unpickle and runs it.
    with pytest.raises(RuntimeError):
        torch.export.load(io.BytesIO(hostile))
    assert canary.exists()


def test_pickled_weights_are_refused(archive: bytes, tmp_path: Path) -> None:
    canary = tmp_path / "executed"

    def mark_pickled(config: dict) -> None:  # type: ignore[type-arg]
        for meta in config["config"].values():
            meta["use_pickle"] = True

    payload = pickle.dumps(_OpensFile(canary))
    hostile = rewrite(archive, edit_json("model_weights_config.json", mark_pickled))
    hostile = rewrite(hostile, lambda n, p: payload if "/weights/weight_" in n else p)
    with pytest.raises(ModelLoadError, match="pickled"):
        load_archive(hostile)
    assert not canary.exists()


def test_python_object_constants_are_refused(archive: bytes) -> None:
    def add_object(config: dict) -> None:  # type: ignore[type-arg]
        config["config"]["evil"] = {
            "path_name": "custom_obj_0",
            "is_param": False,
            "use_pickle": False,
        }

    hostile = rewrite(archive, edit_json("model_constants_config.json", add_object))
    with pytest.raises(ModelLoadError, match="Python object"):
        load_archive(hostile)


def test_shape_expressions_that_would_run_code_are_refused(archive: bytes, tmp_path: Path) -> None:
    canary = tmp_path / "executed"
    injected = f"__import__('builtins').open('{canary}', 'w')"

    def inject(document: dict) -> None:  # type: ignore[type-arg]
        values = document["graph_module"]["graph"]["sym_int_values"]
        values["evil"] = {"as_expr": {"expr_str": injected, "hint": None}}

    hostile = rewrite(archive, edit_json("models/model.json", inject))
    with pytest.raises(ModelLoadError, match="symbolic shape"):
        load_archive(hostile)
    assert not canary.exists()


def test_graphs_calling_arbitrary_torch_functions_are_refused(archive: bytes) -> None:
    def retarget(document: dict) -> None:  # type: ignore[type-arg]
        for node in document["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.save"
                return
        raise AssertionError("no relu node to retarget")

    hostile = rewrite(archive, edit_json("models/model.json", retarget))
    with pytest.raises(ModelLoadError):
        load_archive(hostile)


@pytest.mark.parametrize(
    "payload", [b"", b"not a zip", b"PK\x03\x04" + b"\x00" * 64], ids=["empty", "text", "truncated"]
)
def test_files_that_are_not_archives_are_refused(payload: bytes) -> None:
    with pytest.raises(ModelLoadError):
        load_archive(payload)


def test_archives_with_compiled_code_are_refused(archive: bytes) -> None:
    source = zipfile.ZipFile(io.BytesIO(archive))
    root = source.namelist()[0].split("/")[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
        target.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelLoadError, match="compiled code"):
        load_archive(out.getvalue())


def test_server_refuses_bad_archives_and_serves_the_rest(archive: bytes, tmp_path: Path) -> None:
    (tmp_path / "good.pt2").write_bytes(archive)
    (tmp_path / "broken.pt2").write_bytes(b"not a zip")
    (tmp_path / "bad name!.pt2").write_bytes(archive)
    running = start(
        "127.0.0.1:0", Settings(device="cpu", builtins=False, model_repository=tmp_path)
    )
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=30) as c:
            listed = {m.name: m for m in c.list_models()}
            assert set(listed) == {"good", "broken"}  # the bad name is skipped, not listed
            assert listed["good"].state == "READY"
            broken = listed["broken"]
            assert broken.state == "FAILED" and "not a zip archive" in broken.reason
            assert [(v.version, v.state) for v in broken.versions] == [("1", "FAILED")]
            x = np.zeros((2, 3, 16, 16), np.float32)
            r = c.analyze("good", x, ["conv1"], Objective.sum())
            assert r.gradients["conv1"].shape == (2, 8, 16, 16)
            with pytest.raises(GradtapError) as failed:
                c.analyze("broken", x, ["conv1"], Objective.sum())
            assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert failed.value.reason == "MODEL_FAILED"
            assert "not a zip archive" in failed.value.message
            assert c.health() == "SERVING"
    finally:
        running.server.stop(None).wait()


@pytest.mark.parametrize(
    ("padding", "why"),
    [
        ({"mask": "attention_mask", "side": "up"}, "padding must be"),
        ({"mask": "attention_mask", "side": "left", "pad_token_id": -1}, "padding must be"),
        ({"mask": "attention_mask", "side": "left", "run": "x"}, "padding must be"),
        ({"mask": "nope", "side": "left"}, "padding names the mask input 'nope'"),
    ],
)
def test_a_malformed_padding_declaration_refuses_the_archive_naming_it(
    padding: dict[str, object], why: str
) -> None:
    buffer = io.BytesIO()
    options = json.dumps({"padding": padding})
    torch.export.save(export_builtin("seed-mlp"), buffer, extra_files={"gradtap.json": options})
    with pytest.raises(ModelLoadError, match=why):
        Registry(torch.device("cpu")).load("mlp", "1", buffer.getvalue(), "test")


def test_a_tokenizer_file_tokenizers_cannot_read_refuses_the_archive() -> None:
    buffer = io.BytesIO()
    torch.export.save(
        export_builtin("seed-mlp"), buffer, extra_files={"tokenizer.json": '{"model": 1}'}
    )
    with pytest.raises(ModelLoadError, match="tokenizer.json: tokenizers cannot read it"):
        Registry(torch.device("cpu")).load("mlp", "1", buffer.getvalue(), "test")

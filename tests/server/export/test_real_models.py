"""Real architectures, one per family, exported by `gradtap export` and served: described in
the user's words, and every output, activation and gradient equal to what the original
module computes in-process. Hugging Face (text encoder, causal language models,
encoder-decoder, vision, speech), a factory (python:MODULE:FACTORY), timm (through the bench's
import shim where torchvision cannot load) and torchvision (skipped where it cannot load)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective, Target
from gradtap.server import Settings, start
from gradtap.server.export import Exported, ExportOptions, export
from gradtap.server.export.huggingface import hf_model
from torch import nn

from bench.architectures import ARCHITECTURES, chosen, importable
from bench.timm_shim import StandInUsed, import_timm, torchvision_error

from ...cli.running import gradtap
from .conftest import SEQUENCE, RealServed

RTOL, ATOL = 1e-4, 1e-5
VOCAB = 97

NAMES = {
    "gpt2": (["input_ids", "attention_mask"], ["logits"]),
    "llama": (["input_ids", "attention_mask"], ["logits"]),
    "bert": (["input_ids", "attention_mask"], ["logits"]),
    "t5": (
        ["input_ids", "attention_mask", "decoder_input_ids"],
        ["logits", "encoder_last_hidden_state"],
    ),
    "vit": (["pixel_values"], ["logits"]),
    "whisper": (["input_features", "decoder_input_ids"], ["logits", "encoder_last_hidden_state"]),
}
"""Each family's input and output names, as its ModelOutput and forward name them."""


@pytest.fixture
def client(real: RealServed) -> Any:
    with Client(real.address, timeout=120) as c:
        yield c


def _inputs(family: str, rows: int = 2, length: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, (rows, length))
    mask = np.ones((rows, length), dtype=np.int64)
    if family in ("gpt2", "llama", "bert", "t5"):
        found = {"input_ids": ids, "attention_mask": mask}
        if family == "t5":
            found["decoder_input_ids"] = rng.integers(0, VOCAB, (rows, 4))
        return found
    if family == "vit":
        return {"pixel_values": rng.standard_normal((rows, 3, 32, 32)).astype(np.float32)}
    return {
        "input_features": rng.standard_normal((rows, 16, 64)).astype(np.float32),
        "decoder_input_ids": rng.integers(0, VOCAB, (rows, 4)),
    }


def _original(real: RealServed, family: str) -> nn.Module:
    """The Hugging Face module the archive came from: the same config, the same seed."""
    return hf_model(real.directories[family], seed=0)


def _run(module: nn.Module, family: str, inputs: dict[str, np.ndarray]) -> Any:
    kwargs: dict[str, Any] = {k: torch.from_numpy(v) for k, v in inputs.items()}
    if family in ("gpt2", "llama"):
        mask = kwargs["attention_mask"]
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if family != "vit":
        kwargs["use_cache"] = False
    return module(**kwargs)


@pytest.mark.parametrize("family", list(NAMES))
def test_each_family_is_described_with_named_inputs_outputs_and_dimensions(
    client: Client, family: str
) -> None:
    d = client.describe(family)
    inputs, outputs = NAMES[family]
    assert [s.name for s in d.inputs] == inputs
    assert [s.name for s in d.outputs] == outputs
    for spec in [*d.inputs, *d.outputs]:
        assert spec.shape[0] is None and spec.dims[0] == "batch"
        named = [n for n, size in zip(spec.dims, spec.shape) if size is None]
        assert all(named), f"{spec.name}: a dynamic dimension without a name"
        assert len(set(named)) == len(named), f"{spec.name}: {spec.dims} repeats a name"
    if family in ("gpt2", "llama", "bert", "t5"):
        ids = d.inputs[0]
        assert ids.dims == ("batch", "sequence") and ids.high == VOCAB
        assert ids.min_shape[1] == SEQUENCE[0] and ids.max_shape[1] == SEQUENCE[1]
        assert d.inputs[1].high is None  # the mask indexes no embedding


@pytest.mark.parametrize("family", list(NAMES))
def test_each_familys_outputs_match_the_original_module(
    real: RealServed, client: Client, family: str
) -> None:
    inputs = _inputs(family)
    r = client.analyze(family, list(inputs.values()), outputs=True)
    with torch.no_grad():
        want = _run(_original(real, family), family, inputs)
    for i, name in enumerate(NAMES[family][1]):
        np.testing.assert_allclose(r.outputs[i], want[name].numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("family", "block"), [("gpt2", "transformer.h.0"), ("llama", "model.layers.1")]
)
def test_a_blocks_activation_and_gradient_match_eager_retain_grad(
    real: RealServed, client: Client, family: str, block: str
) -> None:
    inputs = _inputs(family)
    r = client.analyze(
        family,
        list(inputs.values()),
        Target(block, capture="both"),
        Objective.logit(5, position=-1, output="logits"),
    )
    module = _original(real, family)
    kept: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, __: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        kept["hidden"] = hidden

    handle = module.get_submodule(block).register_forward_hook(keep)
    try:
        logits = _run(module, family, inputs).logits
    finally:
        handle.remove()
    logits[:, -1, 5].sum().backward()
    hidden = kept["hidden"]
    np.testing.assert_allclose(r.activations[block], hidden.detach().numpy(), rtol=RTOL, atol=ATOL)
    assert hidden.grad is not None
    np.testing.assert_allclose(r.gradients[block], hidden.grad.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_left_padded_row_gives_what_it_gives_alone(client: Client, family: str) -> None:
    rng = np.random.default_rng(5)
    ids = rng.integers(0, VOCAB, (2, 7))
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, :3] = 0  # row 1: three pads, then four tokens
    padded = client.analyze(family, [ids, mask], outputs=True).outputs[0]
    alone = client.analyze(family, [ids[1:, 3:], mask[1:, 3:]], outputs=True).outputs[0]
    np.testing.assert_allclose(padded[1, 3:], alone[0], rtol=RTOL, atol=ATOL)


def test_an_objective_and_an_attribution_take_an_output_by_name(client: Client) -> None:
    x = _inputs("vit")["pixel_values"]
    by_name = client.analyze("vit", x, "pixel_values", Objective.logit(2, output="logits"))
    by_position = client.analyze("vit", x, "pixel_values", Objective.logit(2, output=0))
    assert by_name.loss == by_position.loss
    np.testing.assert_array_equal(
        by_name.gradients["pixel_values"], by_position.gradients["pixel_values"]
    )
    named = client.attribute("vit", x, "saliency", index=2, output="logits")
    positioned = client.attribute("vit", x, "saliency", index=2, output=0)
    np.testing.assert_array_equal(named.attribution, positioned.attribution)
    t5 = _inputs("t5")
    second = client.analyze("t5", list(t5.values()), (), Objective.sum(output=1))
    named_second = client.analyze(
        "t5", list(t5.values()), (), Objective.sum(output="encoder_last_hidden_state")
    )
    assert second.loss == named_second.loss


def test_an_unknown_output_name_is_refused_naming_the_field_and_the_outputs(
    client: Client,
) -> None:
    x = _inputs("vit")["pixel_values"]
    with pytest.raises(GradtapError) as e:
        client.analyze("vit", x, "pixel_values", Objective.sum(output="logit"))
    assert e.value.reason == "UNKNOWN_OUTPUT"
    assert e.value.field == "objective.sum.site.output_name"
    assert "logits" in e.value.message
    with pytest.raises(GradtapError) as e:
        client.attribute("vit", x, "saliency", index=0, output="scores")
    assert (e.value.reason, e.value.field) == ("UNKNOWN_OUTPUT", "output_name")


def test_a_shape_error_names_the_dimension_and_its_range(client: Client) -> None:
    ids = np.zeros((2, SEQUENCE[1] + 1), dtype=np.int64)
    with pytest.raises(GradtapError) as e:
        client.analyze("gpt2", [ids, np.ones_like(ids)], outputs=True)
    assert e.value.reason == "WRONG_SHAPE"
    assert e.value.message == (
        f"inputs[0] has shape [2, {SEQUENCE[1] + 1}]; gpt2 takes input_ids (batch 1..64, "
        f"sequence {SEQUENCE[0]}..{SEQUENCE[1]}): dimension 1 is above {SEQUENCE[1]}"
    )
    with pytest.raises(GradtapError) as e:
        client.analyze("gpt2", [ids[:, :5], np.ones((2, 6), dtype=np.int64)], outputs=True)
    assert "dimension 1 is 6, but sequence is 5 in inputs[0]" in e.value.message


def test_the_causal_lm_check_of_the_export_covers_a_left_padded_row(real: RealServed) -> None:
    assert real.exported["gpt2"].checked == 3  # two inputs, and the padded row
    assert real.exported["gpt2"].worst_ratio <= 1.0
    assert real.exported["bert"].checked == 2


def test_the_cli_describes_names_and_sends_token_ids_from_the_vocabulary(
    real: RealServed,
) -> None:
    described = gradtap("describe", "gpt2", "--address", real.address)
    assert described.returncode == 0, described.stderr
    assert "input_ids       int64  (batch, sequence)" in described.stdout
    assert "batch 1..64, sequence 2..32  0..96" in described.stdout
    assert "logits  float32  (batch, sequence, 97)" in described.stdout
    analyzed = gradtap(
        "analyze",
        "t5",
        "--objective",
        "sum",
        "--objective-output",
        "encoder_last_hidden_state",
        "--address",
        real.address,
    )
    assert analyzed.returncode == 0, analyzed.stderr
    assert "objective  sum at output encoder_last_hidden_state" in analyzed.stdout
    assert "(input_ids) is random int64 (1, 16), token ids drawn from 0..96" in analyzed.stderr
    assert "(attention_mask) is random int64 (1, 16), all ones (a mask)" in analyzed.stderr


def test_the_cli_lists_every_call_of_a_module_and_the_notes_of_in_place_nodes(
    real: RealServed,
) -> None:
    described = gradtap("describe", "block", "--address", real.address)
    assert described.returncode == 0, described.stderr
    relu = next(line for line in described.stdout.splitlines() if line.split()[:1] == ["relu"])
    assert "(calls: " in relu and relu.count(",") == 2
    assert "notes" in described.stdout and "cannot undo because" in described.stdout


def test_a_constant_keyword_input_is_fixed_at_export_and_never_sent(real: RealServed) -> None:
    t5 = real.exported["t5"].model
    assert t5.fixed_inputs == {"use_cache": False}
    assert "use_cache" not in [s.name for s in t5.inputs]
    assert [r.type for r in t5.renamed] == ["transformers.modeling_outputs.Seq2SeqLMOutput"]


# -- timm and torchvision models by name ---------------------------------------------------

VISION = {
    "timm": ("timm:regnety_002", "s2"),
    "torchvision": ("torchvision:mobilenet_v3_small", "features.3"),
}
"""A small model of each vision library, and a module in its middle."""


@contextmanager
def timm_leaves_afterwards() -> Iterator[None]:
    """timm, imported inside (through the shim where it must be), is forgotten afterwards: no
    other test meets a timm that the shim imported."""
    had = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - had:
            if name.split(".")[0] == "timm":
                del sys.modules[name]


@dataclass
class VisionServed:
    address: str
    exported: Exported
    target: str


@pytest.fixture(scope="module", params=list(VISION))
def vision(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The library's model exported by `gradtap export`'s code and served; timm through the
    bench's import shim where torchvision cannot load (its stand-ins leave with the module);
    skipped, with the import error as the reason, where the library cannot be imported."""
    library = request.param
    with timm_leaves_afterwards():
        if library == "timm":
            reason = importable("timm")
        else:
            reason = torchvision_error()
            reason = reason and f"torchvision cannot be imported here ({reason})"
        if reason:
            pytest.skip(reason)
        source, target = VISION[library]
        exported = export(source, ExportOptions(input_shape=(3, 64, 64)))
        repository = tmp_path_factory.mktemp(f"{library}-repository")
        (repository / "vision.pt2").write_bytes(exported.data)
        running = start(
            "127.0.0.1:0", Settings(device="cpu", model_repository=repository, builtins=False)
        )
        try:
            yield VisionServed(f"127.0.0.1:{running.port}", exported, target)
        finally:
            running.server.stop(None).wait()


def test_a_timm_or_torchvision_model_is_served_described_and_matches_eager(
    vision: VisionServed,
) -> None:
    with Client(vision.address, timeout=120) as c:
        d = c.describe("vision")
        assert [s.name for s in d.inputs] == ["x"] and d.inputs[0].dims[0] == "batch"
        assert d.inputs[0].shape == (None, 3, 64, 64)
        assert [s.name for s in d.outputs] == ["output"]
        assert d.outputs[0].shape == (None, 1000) and d.outputs[0].dims[0] == "batch"
        x = np.random.default_rng(4).standard_normal((2, 3, 64, 64)).astype(np.float32)
        r = c.analyze(
            "vision",
            x,
            Target(vision.target, capture="both"),
            Objective.logit(7),
            input_grads=True,
            outputs=True,
        )
    module = vision.exported.module
    kept: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, __: Any, output: torch.Tensor) -> torch.Tensor:
        output.retain_grad()
        kept["value"] = output
        return output.clone()  # what follows may change its input in place; this stays

    handle = module.get_submodule(vision.target).register_forward_hook(keep)
    inputs = torch.from_numpy(x).requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = module(inputs)
            logits[:, 7].sum().backward()
    finally:
        handle.remove()
    value = kept["value"]
    assert value.grad is not None and inputs.grad is not None
    np.testing.assert_allclose(r.outputs[0], logits.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r.activations[vision.target], value.detach(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r.gradients[vision.target], value.grad, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r.input_grads[0], inputs.grad, rtol=RTOL, atol=ATOL)


def test_without_torchvision_timm_runs_only_through_stand_ins_that_raise_when_used() -> None:
    why = torchvision_error()
    if not why:
        pytest.skip("torchvision imports here: timm needs no stand-in")
    with timm_leaves_afterwards():
        timm = import_timm()
        with pytest.raises(StandInUsed, match=r"torchvision\.transforms\.\w+ is, or is built on"):
            timm.data.create_transform(32)
        with pytest.raises(StandInUsed, match="stand-in for torchvision"):
            timm.layers.create_norm.FrozenBatchNorm2d(4)
        assert not [m for m in sys.modules if m.split(".")[0] == "torchvision"]
        with pytest.raises(ImportError):
            import torchvision  # noqa: F401


def test_gradtap_export_names_why_timm_cannot_be_imported(tmp_path: Path) -> None:
    if not torchvision_error():
        pytest.skip("torchvision imports here, so timm imports without a stand-in")
    done = gradtap("export", "timm:regnety_002", "--out", str(tmp_path / "r.pt2"))
    assert done.returncode == 1
    assert "timm: sources need timm, which cannot be imported here" in done.stderr
    assert "torchvision" in done.stderr
    assert not (tmp_path / "r.pt2").exists()


def test_every_architecture_of_issue_10_is_built_here_as_itself_or_a_stated_equivalent() -> None:
    assert len(ARCHITECTURES) == 18
    assert {a.family for a in ARCHITECTURES} == {"torchvision", "timm", "huggingface"}
    with timm_leaves_afterwards():
        built = [(a, *chosen(a, "full")) for a in ARCHITECTURES]
    for a, way, why in built:
        assert way is not None, f"{a.name}: {why}"
        assert way is a.ways[0] or way.about, f"{a.name}: an equivalent that says not how"
        assert len(why) == a.ways.index(way), why  # a reason for each way passed over

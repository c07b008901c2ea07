"""Attribution patching in one request, and the per-token and per-head views of a language
model's nodes, against the hand-written recipes in-process: on the Hugging Face module (the
GPT-2-style, the Llama-style and the MiniLM encoder) and on the exported program itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective, Target
from torch import nn

from gradtap.v1 import gradtap_pb2 as pb

from ... import language_models as lm
from ...conftest import LanguageServed

CLEAN = np.array([[5, 17, 3, 42, 8, 23, 9], [1, 2, 3, 4, 5, 6, 7]], dtype=np.int64)
CORRUPT = np.array([[5, 17, 3, 61, 8, 23, 9], [1, 2, 3, 4, 5, 6, 70]], dtype=np.int64)
METRIC = Objective.logit_diff([11, 12], [13, 14])
TARGETS = {
    "lm-gpt2": ["transformer.wte", "transformer.h.0", "transformer.h.1.attn"],
    "lm-llama": ["model.embed_tokens", "model.layers.0", "model.layers.1.self_attn"],
}


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[0, -1, 11] - logits[0, -1, 13]) + (logits[1, -1, 12] - logits[1, -1, 14])


def first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[no-any-return]


def hugging_face(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: module(input_ids=ids)[0]  # type: ignore[no-any-return]


def recipe(
    module: nn.Module,
    paths: list[str],
    logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Attribution patching as nnsight and TransformerLens users write it: cache the corrupted
    activations, run the clean input with gradients kept, multiply. `logits_of` runs the
    module on ids (by default the Hugging Face module's own call)."""
    logits_of = logits_of or hugging_face(module)
    corrupt: dict[str, torch.Tensor] = {}
    clean: dict[str, torch.Tensor] = {}

    def saver(store: dict[str, torch.Tensor], path: str, keep_grad: bool) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            value = first(output)
            if keep_grad:
                value.retain_grad()
            store[path] = value

        return hook

    for store, ids, grad in ((corrupt, CORRUPT, False), (clean, CLEAN, True)):
        handles = [
            module.get_submodule(p).register_forward_hook(saver(store, p, grad)) for p in paths
        ]
        try:
            with torch.set_grad_enabled(grad):
                logits = logits_of(torch.from_numpy(ids))
                if grad:
                    metric(logits).backward()
        finally:
            for h in handles:
                h.remove()
    module.zero_grad(set_to_none=True)
    return {p: ((corrupt[p] - clean[p]) * clean[p].grad).detach() for p in paths}  # type: ignore[operator]


@pytest.mark.parametrize("name", lm.CAUSAL)
def test_attribution_patching_matches_the_hand_written_recipe(
    lm_served: LanguageServed, lm_client: Client, name: str
) -> None:
    paths = TARGETS[name]
    mask = np.ones_like(CLEAN)
    r = lm_client.attribution_patching(name, [CLEAN, mask], [CORRUPT, mask], METRIC, paths)
    expected = recipe(lm_served.modules[name], paths)
    assert list(r.patching) == paths
    for path in paths:
        np.testing.assert_allclose(
            r.patching[path], expected[path].sum(-1).numpy(), rtol=1e-4, atol=1e-6
        )
    with torch.no_grad():
        clean_metric = metric(lm_served.modules[name](input_ids=torch.from_numpy(CLEAN))[0])
    assert r.loss == pytest.approx(float(clean_metric), rel=1e-5)
    whole = lm_client.attribution_patching(
        name, [CLEAN, mask], [CORRUPT, mask], METRIC, paths[1], reduce_hidden=False
    )
    np.testing.assert_allclose(
        whole.patching[paths[1]], expected[paths[1]].numpy(), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("name", lm.CAUSAL)
def test_attribution_patching_matches_the_recipe_on_the_same_exported_program(
    lm_served: LanguageServed, lm_client: Client, name: str
) -> None:
    # The hand-written recipe's hooks on the archive the server serves, its modules given
    # back by torch.export.unflatten.
    unflat = torch.export.unflatten(torch.export.load(lm_served.repository / f"{name}.pt2"))
    paths = TARGETS[name]

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return unflat(input_ids=ids, attention_mask=torch.ones_like(ids))[0]  # type: ignore[no-any-return]

    mask = np.ones_like(CLEAN)
    r = lm_client.attribution_patching(name, [CLEAN, mask], [CORRUPT, mask], METRIC, paths)
    expected = recipe(unflat, paths, logits_of)
    for path in paths:
        np.testing.assert_allclose(
            r.patching[path], expected[path].sum(-1).numpy(), rtol=1e-4, atol=1e-6
        )


def test_attribution_patching_on_an_encoder_s_output(
    lm_served: LanguageServed, lm_client: Client
) -> None:
    # MiniLM: the metric is a difference of two hidden units of the [CLS] position.
    module = lm_served.modules[lm.ENCODER]
    clean = np.array([[101, 2023, 2003, 1037, 3231, 102]])
    corrupt = np.array([[101, 2023, 2003, 1996, 3231, 102]])
    paths = ["embeddings", "encoder.layer.0", "encoder.layer.3.attention"]
    objective = Objective.logit_diff(7, 11, position=0, output="last_hidden_state")
    mask = np.ones_like(clean)
    r = lm_client.attribution_patching(lm.ENCODER, [clean, mask], [corrupt, mask], objective, paths)
    kept: dict[str, dict[str, torch.Tensor]] = {"clean": {}, "corrupt": {}}
    for run, ids in (("corrupt", corrupt), ("clean", clean)):
        handles = [
            module.get_submodule(p).register_forward_hook(
                lambda _, __, out, p=p, run=run: kept[run].__setitem__(p, first(out))
            )
            for p in paths
        ]
        try:
            with torch.set_grad_enabled(run == "clean"):
                hidden = module(input_ids=torch.from_numpy(ids)).last_hidden_state
                if run == "clean":
                    for value in kept["clean"].values():
                        value.retain_grad()
                    (hidden[0, 0, 7] - hidden[0, 0, 11]).backward()
        finally:
            for h in handles:
                h.remove()
    module.zero_grad(set_to_none=True)
    for p in paths:
        a, c = kept["clean"][p], kept["corrupt"][p]
        assert a.grad is not None
        expected = ((c - a) * a.grad).sum(-1).detach().numpy()
        np.testing.assert_allclose(r.patching[p], expected, rtol=1e-4, atol=1e-6)
    assert r.loss == pytest.approx(float((hidden[0, 0, 7] - hidden[0, 0, 11]).detach()), rel=1e-5)


def test_patching_errors_name_the_field(lm_client: Client, lm_served: LanguageServed) -> None:
    mask = np.ones_like(CLEAN)
    with pytest.raises(GradtapError) as caught:
        lm_client.attribution_patching(
            "lm-gpt2", [CLEAN, mask], [CORRUPT[:, :5], mask], METRIC, ["transformer.h.0"]
        )
    assert (caught.value.reason, caught.value.field) == ("WRONG_SHAPE", "corrupt_inputs[0]")
    with pytest.raises(GradtapError) as caught:
        lm_client.attribution_patching(
            "lm-gpt2", [CLEAN, mask], [CORRUPT, mask], METRIC, ["transformer.h.9"]
        )
    assert caught.value.reason == "UNKNOWN_TARGET"
    # On the wire: a patching target needs corrupt_inputs, and corrupt_inputs a patching target.
    from gradtap.client._tensor import encode

    channel_call = _raw_analyze(lm_served.address)
    request = pb.AnalyzeRequest(
        model=pb.Model(name="lm-gpt2"),
        inputs=[encode(CLEAN), encode(mask)],
        targets=[pb.TargetLayer(name="transformer.h.0", capture=pb.CAPTURE_ATTRIBUTION_PATCHING)],
        objective=METRIC.message,
    )
    assert channel_call(request) == ("CORRUPT_INPUTS_REQUIRED", "corrupt_inputs")
    request.ClearField("targets")
    request.targets.add(name="transformer.h.0")
    request.corrupt_inputs.extend([encode(CORRUPT), encode(mask)])
    assert channel_call(request) == ("PATCHING_TARGET_REQUIRED", "targets")


def _raw_analyze(address: str) -> Any:
    import grpc
    from gradtap.client._errors import from_rpc_error

    def call(request: pb.AnalyzeRequest) -> tuple[str, str]:
        with grpc.insecure_channel(address) as channel:
            stub = channel.unary_stream(
                "/gradtap.v1.GradientService/Analyze",
                request_serializer=pb.AnalyzeRequest.SerializeToString,
                response_deserializer=pb.AnalyzeResponse.FromString,
            )
            try:
                list(stub(request, timeout=60))
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                return error.reason or "", error.field or ""
        return "", ""

    return call


# -- per-token and per-head views ---------------------------------------------------------------


def gradient_and_activation(module: nn.Module, path: str, pre: bool = False) -> Any:
    """The clean metric's gradient and the activation at a module's output (or, with `pre`,
    its input), on the Hugging Face module."""
    kept: list[torch.Tensor] = []

    def keep(value: torch.Tensor) -> None:
        value.retain_grad()
        kept.append(value)

    target = module.get_submodule(path)
    handle = (
        target.register_forward_pre_hook(lambda _, args: keep(args[0]))
        if pre
        else target.register_forward_hook(lambda _, __, out: keep(first(out)))
    )
    try:
        metric(module(input_ids=torch.from_numpy(CLEAN))[0]).backward()
    finally:
        handle.remove()
        module.zero_grad(set_to_none=True)
    return kept[0].grad.detach(), kept[0].detach()


@pytest.mark.parametrize("name", lm.CAUSAL)
def test_per_token_views_keep_the_sequence_dimension(
    lm_served: LanguageServed, lm_client: Client, name: str
) -> None:
    node = TARGETS[name][1]
    targets = [
        Target(node, reduce="norm", dims=-1),
        Target(node, reduce="gradient_x_activation", dims=-1, capture="gradient"),
    ]
    norm = lm_client.analyze(name, [CLEAN, np.ones_like(CLEAN)], targets[0], METRIC)
    product = lm_client.analyze(name, [CLEAN, np.ones_like(CLEAN)], targets[1], METRIC)
    gradient, activation = gradient_and_activation(lm_served.modules[name], node)
    np.testing.assert_allclose(norm.gradients[node], gradient.norm(dim=-1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(
        product.gradients[node], (gradient * activation).sum(-1).numpy(), rtol=1e-4, atol=1e-7
    )
    assert product.reductions[node].reduce == "gradient_x_activation"
    assert product.gradients[node].shape == CLEAN.shape


HEADS = {
    "lm-gpt2": ("transformer.h.0.attn.c_proj", 2),
    "lm-llama": ("model.layers.0.self_attn.o_proj", 4),
}


@pytest.mark.parametrize("name", lm.CAUSAL)
def test_per_head_tensors_are_nodes_shaped_batch_sequence_heads_dims(
    lm_served: LanguageServed, lm_client: Client, name: str
) -> None:
    # The attention's per-head output, (N, S, H, D), is the transpose that brings the heads
    # back after attention, before they merge into the output projection's input: found by
    # op and shape in describe().
    projection, heads = HEADS[name]
    described = lm_client.describe(name)
    per_head = [
        n.name
        for n in described.nodes
        if n.op == "aten.transpose.int"
        and len(n.shape) == 4
        and n.shape[2:] == (heads, 32 // heads)
    ]
    layer = projection.rsplit(".", 2)[0]  # the block whose heads these are
    assert per_head, "no (N, S, H, D) node"
    found = per_head[0]  # graph order: the first layer's merged heads come first
    r = lm_client.analyze(
        name,
        [CLEAN, np.ones_like(CLEAN)],
        [Target(found, reduce="norm", dims=-1, capture="both")],
        METRIC,
    )
    gradient, activation = gradient_and_activation(lm_served.modules[name], projection, pre=True)
    split = (*CLEAN.shape, heads, 32 // heads)
    np.testing.assert_allclose(
        r.activations[found], activation.reshape(split).norm(dim=-1).numpy(), rtol=1e-4
    )
    np.testing.assert_allclose(
        r.gradients[found], gradient.reshape(split).norm(dim=-1).numpy(), rtol=1e-4
    )
    assert r.gradients[found].shape == (*CLEAN.shape, heads)
    assert layer in described.modules


def test_gradient_x_activation_refuses_a_second_capture(lm_client: Client) -> None:
    target = Target("transformer.h.0", reduce="gradient_x_activation", dims=-1, capture="both")
    with pytest.raises(GradtapError) as caught:
        lm_client.analyze("lm-gpt2", [CLEAN, np.ones_like(CLEAN)], target, METRIC)
    assert (caught.value.reason, caught.value.field) == ("BAD_REDUCTION", "targets[0].capture")

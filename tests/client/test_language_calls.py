"""The language-model calls and objectives refuse what they cannot send, before sending, and
encode what they can as the contract says."""

from __future__ import annotations

import numpy as np
import pytest
from gradtap.client import Objective, Target
from gradtap.client._language import attribute_tokens, attribution_patching

from gradtap.v1 import gradtap_pb2 as pb


def test_objectives_encode_their_fields() -> None:
    logit = Objective.logit(7, position=-1).message.logit
    assert (list(logit.index), logit.position, logit.HasField("position")) == ([7], -1, True)
    assert not Objective.logit(7).message.logit.HasField("position")
    ce = Objective.cross_entropy(np.zeros((2, 5)), class_dim=-1, shift=True).message.cross_entropy
    assert (ce.class_dim, ce.shift, ce.HasField("ignore_index")) == (-1, True, False)
    assert Objective.cross_entropy([1], ignore_index=0).message.cross_entropy.ignore_index == 0
    lp = Objective.log_prob([[1, 2]], positions=[[3, -1]]).message.log_prob
    assert (list(lp.tokens.shape), list(lp.positions.shape)) == ([1, 2], [1, 2])
    assert not Objective.log_prob([1, 2]).message.log_prob.HasField("positions")
    diff = Objective.prob_diff([1, 2], 3, position=None).message.logit_diff
    assert (list(diff.correct), list(diff.wrong), diff.probabilities) == ([1, 2], [3], True)
    assert not diff.HasField("position")
    assert Objective.logit_diff(1, 2).message.logit_diff.position == -1


def test_objectives_refuse_ids_that_are_not_integers() -> None:
    with pytest.raises(ValueError, match="correct"):
        Objective.logit_diff(1.5, 2)
    with pytest.raises(ValueError, match="index"):
        Objective.logit([[1, 2]])


def test_attribute_tokens_encodes_its_request() -> None:
    call = attribute_tokens(
        "m", np.array([[1, 2, 3]]), [4], method="saliency", aggregate="l2", node="h.0"
    )
    request = call.request
    assert isinstance(request, pb.AttributeTokensRequest)
    assert list(request.prompt.shape) == [3] and list(request.continuation.shape) == [1]
    assert request.method == pb.ATTRIBUTION_METHOD_SALIENCY
    assert request.aggregate == pb.TOKEN_AGGREGATE_L2 and request.node == "h.0"
    assert not request.HasField("n_steps") and not request.HasField("objective")


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"method": "smoothgrad"}, ValueError),
        ({"aggregate": "mean"}, ValueError),
        ({"prompt": np.zeros((2, 3), np.int64)}, ValueError),
        ({"prompt": np.array([0.5, 1.0])}, ValueError),
        ({"objective": "sum"}, TypeError),
    ],
)
def test_attribute_tokens_refuses_before_sending(arguments: dict[str, object], error: type) -> None:
    prompt = arguments.pop("prompt", [1, 2])
    with pytest.raises(error):
        attribute_tokens("m", prompt, None, **arguments)  # type: ignore[arg-type]


def test_attribution_patching_targets_capture_the_patching_estimate() -> None:
    call = attribution_patching(
        "m",
        np.zeros((1, 4), np.int64),
        np.ones((1, 4), np.int64),
        Objective.logit_diff(1, 2),
        ["h.0", Target("h.1", reduce="norm", dims=-1), Target("h.2")],
        outputs=True,
    )
    targets = call.request.targets
    assert [t.capture for t in targets] == [pb.CAPTURE_ATTRIBUTION_PATCHING] * 3
    assert [list(t.reduction.dims) for t in targets] == [[-1], [-1], [-1]]
    assert [t.reduction.reduce for t in targets] == [pb.REDUCE_SUM, pb.REDUCE_NORM, pb.REDUCE_SUM]
    assert len(call.request.corrupt_inputs) == 1 and call.request.outputs
    whole = attribution_patching("m", [0], [1], Objective.sum(), "h.0", reduce_hidden=False)
    assert not whole.request.targets[0].HasField("reduction")


def test_attribution_patching_refuses_before_sending() -> None:
    with pytest.raises(TypeError):
        attribution_patching("m", [0], [1], None, ["h.0"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one target"):
        attribution_patching("m", [0], [1], Objective.sum(), [])
    with pytest.raises(ValueError, match="patching estimate"):
        attribution_patching("m", [0], [1], Objective.sum(), Target("h", capture="both"))


def test_a_gradient_x_activation_target_captures_the_gradient_alone() -> None:
    target = Target("h.0", reduce="gradient_x_activation", dims=-1)
    layer = target.message(pb.CAPTURE_GRADIENT_AND_ACTIVATION)
    assert layer.capture == pb.CAPTURE_GRADIENT
    assert layer.reduction.reduce == pb.REDUCE_GRADIENT_X_ACTIVATION

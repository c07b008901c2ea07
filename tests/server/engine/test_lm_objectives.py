"""The objectives of language models, served, against the Hugging Face module in-process and the
same exported program: logit at a position, log_prob, logit_diff, prob_diff and the sequence
loss, on the GPT-2-style and Llama-style models and on the pretrained MiniLM encoder's output;
and every objective's shape error raised before the forward pass."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradtap.client import Client, GradtapError, Objective
from torch import nn

from ... import language_models as lm
from ...conftest import LanguageServed

RTOL, ATOL = 1e-5, 1e-6
"""float32 on the CPU: the served pass and the module's own run the same operators."""

EMBEDDING = {
    "lm-gpt2": "transformer.wte",
    "lm-llama": "model.embed_tokens",
    lm.ENCODER: "embeddings.word_embeddings",
}
MODELS = (*lm.CAUSAL, lm.ENCODER)
"""On the encoder the objectives read its last hidden state (N, S, 384) as they read logits."""


def ids_and_mask(rows: int = 2, length: int = 9) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(7)
    ids = g.integers(0, lm.VOCABULARY, (rows, length)).astype(np.int64)
    return ids, np.ones_like(ids)


def reference(
    module: nn.Module, path: str, ids: np.ndarray, scalar: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[float, np.ndarray]:
    """The objective and its gradient at module `path`'s output, on the Hugging Face module
    itself (retain_grad on the module's output)."""
    kept: list[torch.Tensor] = []

    def keep(_: nn.Module, __: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    handle = module.get_submodule(path).register_forward_hook(keep)
    try:
        logits = module(input_ids=torch.from_numpy(ids))[0]
        value = scalar(logits)
        value.backward()
    finally:
        handle.remove()
        module.zero_grad(set_to_none=True)
    assert kept[0].grad is not None
    return float(value.detach()), kept[0].grad.numpy()


@functools.cache
def exported(path: Path) -> nn.Module:
    """The archive the server serves, loaded in-process (once per archive)."""
    return torch.export.load(path).module()


def exported_first_output(served: LanguageServed, name: str, ids: np.ndarray) -> torch.Tensor:
    """The first output (logits, or the encoder's last hidden state) of the same exported
    program, run in-process; it takes input_ids and attention_mask by name."""
    with torch.no_grad():
        out = exported(served.repository / f"{name}.pt2")(
            **lm.exported_inputs(name, torch.from_numpy(ids))
        )
    return out[0]  # type: ignore[no-any-return]


def exported_loss(served: LanguageServed, name: str, ids: np.ndarray, scalar: Any) -> float:
    """The objective on the same exported program, run in-process."""
    return float(scalar(exported_first_output(served, name, ids)))


IGNORING = np.array([[7, 7, 7, 1, 2, 3, 4, 5, 6], [9, 8, 7, 7, 6, 5, 4, 3, 2]], dtype=np.int64)
"""Labels of which the 7s count for nothing (ignore_index=7)."""

CASES: dict[str, tuple[Objective, Callable[[torch.Tensor], torch.Tensor]]] = {
    "logit at a position": (
        Objective.logit([3, 41], position=-2),
        lambda z: z[0, -2, 3] + z[1, -2, 41],
    ),
    "log_prob of a continuation": (
        Objective.log_prob([5, 8, 13]),
        lambda z: sum(z[:, p].log_softmax(-1)[:, t].sum() for p, t in zip((5, 6, 7), (5, 8, 13))),
    ),
    "log_prob per row": (
        Objective.log_prob([[1, 2], [3, 4]], positions=[[0, -1], [2, 4]]),
        lambda z: (
            z[0, 0].log_softmax(-1)[1]
            + z[0, -1].log_softmax(-1)[2]
            + z[1, 2].log_softmax(-1)[3]
            + z[1, 4].log_softmax(-1)[4]
        ),
    ),
    "logit_diff": (
        Objective.logit_diff(17, [4, 60]),
        lambda z: (z[0, -1, 17] - z[0, -1, 4]) + (z[1, -1, 17] - z[1, -1, 60]),
    ),
    "prob_diff": (
        Objective.prob_diff(17, 4, position=3),
        lambda z: (z[:, 3].softmax(-1)[:, 17] - z[:, 3].softmax(-1)[:, 4]).sum(),
    ),
    "cross_entropy, class_dim -1": (
        Objective.cross_entropy(np.arange(18).reshape(2, 9), class_dim=-1, reduction="sum"),
        lambda z: F.cross_entropy(z.reshape(-1, z.shape[-1]), torch.arange(18), reduction="sum"),
    ),
    "cross_entropy with an ignore_index": (
        Objective.cross_entropy(IGNORING, class_dim=-1, ignore_index=7),
        lambda z: F.cross_entropy(
            z.reshape(-1, z.shape[-1]), torch.from_numpy(IGNORING).reshape(-1), ignore_index=7
        ),
    ),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_objective_matches_the_module_and_the_exported_program(
    lm_served: LanguageServed, lm_client: Client, name: str, case: str
) -> None:
    objective, scalar = CASES[case]
    ids, mask = ids_and_mask()
    node = EMBEDDING[name]
    r = lm_client.analyze(name, [ids, mask], [node], objective)
    value, gradient = reference(lm_served.modules[name], node, ids, scalar)
    assert r.loss == pytest.approx(value, rel=RTOL, abs=ATOL)
    assert r.loss == pytest.approx(exported_loss(lm_served, name, ids, scalar), rel=RTOL, abs=ATOL)
    np.testing.assert_allclose(r.gradients[node], gradient, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", lm.CAUSAL)
def test_shifted_cross_entropy_is_hugging_face_s_own_loss(
    lm_served: LanguageServed, lm_client: Client, name: str
) -> None:
    ids, mask = ids_and_mask()
    labels = ids.copy()
    labels[0, :3] = -100  # a prompt left out of the loss, as Hugging Face users mask it
    r = lm_client.analyze(
        name, [ids, mask], [EMBEDDING[name]], Objective.cross_entropy(labels, shift=True)
    )
    module = lm_served.modules[name]
    with torch.no_grad():
        expected = module(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
    assert r.loss == pytest.approx(float(expected), rel=RTOL)
    # ... and the same loss, written out, on the exported program's logits.
    logits = exported_first_output(lm_served, name, ids)
    by_hand = F.cross_entropy(
        logits[:, :-1].reshape(-1, lm.VOCABULARY), torch.from_numpy(labels[:, 1:]).reshape(-1)
    )
    assert r.loss == pytest.approx(float(by_hand), rel=RTOL)


def test_a_classifier_s_cross_entropy_keeps_class_dimension_1(lm_client: Client) -> None:
    # (N, C) and (N, C, d) keep PyTorch's rule; class_dim is inferred from the labels' shape.
    ids, mask = ids_and_mask()
    r = lm_client.analyze(
        "lm-gpt2", [ids, mask], [], Objective.cross_entropy(np.zeros((2, 100), np.int64))
    )
    logits = r.outputs[0]
    expected = F.cross_entropy(torch.from_numpy(logits), torch.zeros(2, 100, dtype=torch.long))
    assert r.loss == pytest.approx(float(expected), rel=RTOL)


BAD: dict[str, tuple[Objective, str, str]] = {
    "logit on (N, S, V) without a position": (
        Objective.logit(3),
        "POSITION_REQUIRED",
        "objective.logit.position",
    ),
    "logit index past the vocabulary": (
        Objective.logit(100, position=-1),
        "OUT_OF_RANGE",
        "objective.logit.index",
    ),
    "logit position past the sequence": (
        Objective.logit(3, position=9),
        "OUT_OF_RANGE",
        "objective.logit.position",
    ),
    "log_prob with as many tokens as positions": (
        Objective.log_prob(np.zeros(9, np.int64)),
        "OUT_OF_RANGE",
        "objective.log_prob.tokens",
    ),
    "log_prob positions unlike tokens": (
        Objective.log_prob([1, 2], positions=[1]),
        "WRONG_SHAPE",
        "objective.log_prob.positions",
    ),
    "log_prob tokens for another number of rows": (
        Objective.log_prob(np.zeros((3, 2), np.int64)),
        "WRONG_SHAPE",
        "objective.log_prob.tokens",
    ),
    "logit_diff on (N, S, V) without a position": (
        Objective.logit_diff(1, 2, position=None),
        "POSITION_REQUIRED",
        "objective.logit_diff.position",
    ),
    "logit_diff with three wrong tokens for two rows": (
        Objective.logit_diff(1, [2, 3, 4]),
        "BAD_OBJECTIVE",
        "objective.logit_diff.wrong",
    ),
    "cross_entropy labels that fit neither class dimension": (
        Objective.cross_entropy(np.zeros((2, 8), np.int64)),
        "WRONG_SHAPE",
        "objective.cross_entropy.labels",
    ),
    "cross_entropy label past the vocabulary": (
        Objective.cross_entropy(np.full((2, 9), 100), class_dim=-1),
        "OUT_OF_RANGE",
        "objective.cross_entropy.labels",
    ),
    "shift with class_dim 1": (
        Objective.cross_entropy(np.zeros((2, 9), np.int64), class_dim=1, shift=True),
        "BAD_OBJECTIVE",
        "objective.cross_entropy.shift",
    ),
    "mse of another shape": (
        Objective.mse(np.zeros((2, 9, 99), np.float32)),
        "WRONG_SHAPE",
        "objective.mse.expected",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_shape_error_is_raised_before_the_forward_pass(lm_client: Client, case: str) -> None:
    # A token id past the vocabulary makes the forward pass itself fail (MODEL_REJECTED_INPUT):
    # the objective's error can only come back if it was raised before that pass ran.
    objective, reason, field = BAD[case]
    ids, mask = ids_and_mask()
    ids[0, 0] = 5000
    with pytest.raises(GradtapError) as caught:
        lm_client.analyze("lm-gpt2", [ids, mask], ["transformer.wte"], objective)
    assert (caught.value.reason, caught.value.field) == (reason, field), caught.value.message
    # ... and the forward pass would indeed have failed without the objective's error.
    with pytest.raises(GradtapError, match="could not run") as ran:
        lm_client.analyze("lm-gpt2", [ids, mask], ["transformer.wte"], Objective.sum())
    assert ran.value.reason == "MODEL_REJECTED_INPUT"


def test_ambiguous_labels_are_refused_naming_class_dim(lm_client: Client) -> None:
    # A site (N, S, S) with labels (N, S) fits classes on dimension 1 and on the last.
    ids, mask = ids_and_mask(2, 9)
    node = "transformer.h.0.attn"  # (N, S, 32): labels (2, 9) fit dimension -1 only
    r = lm_client.analyze(
        "lm-gpt2", [ids, mask], [], Objective.cross_entropy(np.zeros((2, 9), np.int64), node=node)
    )
    assert np.isfinite(r.loss)
    ids32, mask32 = ids_and_mask(2, 32)
    with pytest.raises(GradtapError) as caught:
        lm_client.analyze(
            "lm-gpt2",
            [ids32, mask32],
            [],
            Objective.cross_entropy(np.zeros((2, 32), np.int64), node=node),
        )
    assert caught.value.reason == "CLASS_DIM_AMBIGUOUS"
    assert caught.value.field == "objective.cross_entropy.class_dim"

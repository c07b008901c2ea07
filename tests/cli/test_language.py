"""The language-model questions on the command line: the objectives of analyze and perturb
(logit at a position, log_prob, logit_diff, prob_diff, the sequence loss), `gradtap
attribute-tokens` and `gradtap attribution-patching`, each saving what the Python client
returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradtap.client import Client, Objective

from ..conftest import LanguageServed
from .running import gradtap

IDS = np.array([[5, 17, 3, 42, 8, 23, 9, 11], [1, 2, 3, 4, 5, 6, 7, 70]], dtype=np.int64)
LABELS = IDS.copy()
LABELS[0, :3] = -1  # a prompt left out of the loss with --ignore-index -1
PROMPT, CONTINUATION = "5,17,3,42,8,23", "9,11,64"
NODE = "transformer.wte"


@pytest.fixture
def files(tmp_path: Path) -> Path:
    np.save(tmp_path / "ids.npy", IDS)
    np.save(tmp_path / "mask.npy", np.ones_like(IDS))
    np.save(tmp_path / "labels.npy", LABELS)
    corrupt = IDS.copy()
    corrupt[0, 3], corrupt[1, -1] = 61, 4
    np.save(tmp_path / "corrupt.npy", corrupt)
    return tmp_path


OBJECTIVES: dict[str, tuple[list[str], Objective]] = {
    "logit at a position": (
        ["--objective", "logit:3,41", "--position", "-2"],
        Objective.logit([3, 41], position=-2),
    ),
    "log_prob of a continuation": (["--objective", "log_prob:9,11"], Objective.log_prob([9, 11])),
    "log_prob at positions": (
        ["--objective", "log_prob:9,11", "--position", "2,-1"],
        Objective.log_prob([9, 11], positions=[2, -1]),
    ),
    "logit_diff per row": (
        ["--objective", "logit_diff:11,12/13,14"],
        Objective.logit_diff([11, 12], [13, 14]),
    ),
    "prob_diff at a position": (
        ["--objective", "prob_diff:17/4", "--position", "3"],
        Objective.prob_diff(17, 4, position=3),
    ),
    "the shifted next-token loss": (
        ["--objective", "cross_entropy:labels.npy", "--shift", "--ignore-index", "-1"],
        Objective.cross_entropy(LABELS, shift=True, ignore_index=-1),
    ),
    "cross_entropy on the vocabulary dimension": (
        ["--objective", "cross_entropy:ids.npy", "--class-dim", "-1"],
        Objective.cross_entropy(IDS, class_dim=-1),
    ),
}


@pytest.mark.parametrize("case", sorted(OBJECTIVES))
def test_analyze_s_language_model_objectives_save_what_the_client_returns(
    lm_served: LanguageServed, lm_client: Client, files: Path, case: str
) -> None:
    arguments, objective = OBJECTIVES[case]
    result = gradtap(
        "analyze", "lm-gpt2", "-i", "ids.npy", "-i", "mask.npy", "--target", NODE,
        *arguments, "--objective-output", "logits", "--out", "r.npz",
        "--address", lm_served.address, cwd=files,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = lm_client.analyze("lm-gpt2", [IDS, np.ones_like(IDS)], [NODE], objective)
    with np.load(files / "r.npz") as saved:
        assert float(saved["loss"]) == expected.loss
        np.testing.assert_array_equal(saved[f"gradient/{NODE}"], expected.gradients[NODE])
    kind = arguments[1].partition(":")[0]
    assert f"objective  {kind} at output logits" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "option", "said"),
    [
        (["--objective", "sum", "--position", "-1"], "--position", "--position applies to"),
        (["--objective", "logit:3", "--shift"], "--shift", "--shift applies to cross_entropy"),
        (["--objective", "logit:3", "--position", "1,2"], "--position", "reads one position"),
        (["--objective", "logit_diff:17"], "--objective", "CORRECT/WRONG"),
        (["--objective", "log_prob:a"], "--objective", "comma-separated integers"),
        (["--objective", "cross_entropy:no.npy"], "--objective", "does not exist"),
    ],
)
def test_a_misused_objective_option_is_a_usage_error_naming_it(
    lm_served: LanguageServed, arguments: list[str], option: str, said: str
) -> None:
    result = gradtap("analyze", "lm-gpt2", *arguments, "--address", lm_served.address)
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for '{option}'" in result.stderr
    assert said in result.stderr
    assert "Traceback" not in result.stderr


def test_attribute_tokens_prints_a_table_and_saves_what_the_client_returns(
    lm_served: LanguageServed, lm_client: Client, tmp_path: Path
) -> None:
    result = gradtap(
        "attribute-tokens", "lm-llama", "--prompt", PROMPT, "--continuation", CONTINUATION,
        "--method", "integrated_gradients", "--n-steps", "8",
        "--integration-method", "riemann_trapezoid", "--out", "t.npz",
        "--address", lm_served.address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    prompt, continuation = np.array([5, 17, 3, 42, 8, 23]), np.array([9, 11, 64])
    expected = lm_client.attribute_tokens(
        "lm-llama", prompt, continuation, n_steps=8, integration_method="riemann_trapezoid"
    )
    with np.load(tmp_path / "t.npz") as saved:
        assert sorted(saved.files) == ["continuation", "prompt", "scores", "values"]
        np.testing.assert_array_equal(saved["scores"], expected.scores)
        np.testing.assert_array_equal(saved["values"], expected.values)
        np.testing.assert_array_equal(saved["prompt"], prompt)
        np.testing.assert_array_equal(saved["continuation"], continuation)
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("POS"))
    assert header.split() == ["POS", "PROMPT", "->9", "->11", "->64"]
    row = next(line for line in lines if line.startswith("3 "))  # prompt token 3: id 42
    assert row.split() == ["3", "42", *(f"{v:.4g}" for v in expected.scores[:, 3])]


def test_attribute_tokens_takes_text_and_shows_its_tokens(
    lm_served: LanguageServed, lm_client: Client, tmp_path: Path
) -> None:
    # The small models' archives carry a word tokenizer: "t5" is token 5.
    result = gradtap(
        "attribute-tokens", "lm-llama", "--text", "--prompt", "t5 t17 t3 t42",
        "--continuation", "t9 t11", "--method", "saliency", "--out", "t.npz",
        "--address", lm_served.address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = lm_client.attribute_tokens("lm-llama", [5, 17, 3, 42], [9, 11], method="saliency")
    with np.load(tmp_path / "t.npz") as saved:
        np.testing.assert_array_equal(saved["prompt"], [5, 17, 3, 42])
        np.testing.assert_allclose(saved["scores"], expected.scores, rtol=1e-5, atol=1e-7)
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("POS"))
    assert header.split() == ["POS", "PROMPT", "->t9", "->t11"]
    assert next(line for line in lines if line.startswith("3 ")).split()[1] == "t42"


def test_analyze_takes_rows_of_text_and_shows_their_tokens(
    lm_served: LanguageServed, lm_client: Client, tmp_path: Path
) -> None:
    result = gradtap(
        "analyze", "lm-gpt2", "--text", "t5 t17 t3", "--text", "t8 t23",
        "--objective", "log_prob:17", "--position", "1", "--out", "a.npz",
        "--address", lm_served.address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = lm_client.analyze(
        "lm-gpt2", texts=["t5 t17 t3", "t8 t23"], objective=Objective.log_prob([17], [1])
    )
    with np.load(tmp_path / "a.npz") as saved:
        np.testing.assert_allclose(saved["output/0"], expected.outputs[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["loss"], expected.loss, rtol=1e-5)
    rows = result.stdout.split("ROW", 1)[1].splitlines()[1:3]
    assert [row.split() for row in rows] == [["0", "t5", "t17", "t3"], ["1", "t8", "t23"]]


def test_analyze_refuses_text_with_inputs(lm_served: LanguageServed, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", IDS)
    result = gradtap(
        "analyze", "lm-gpt2", "--text", "t5", "-i", "x.npy", "--address", lm_served.address,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "--text" in result.stderr


def test_attribute_tokens_at_a_node_with_the_l2_norm(
    lm_served: LanguageServed, lm_client: Client, tmp_path: Path
) -> None:
    np.save(tmp_path / "prompt.npy", np.array([[5, 17, 3, 42, 8, 23]]))  # a tokenizer's (1, P)
    result = gradtap(
        "attribute-tokens", "lm-gpt2", "--prompt", "prompt.npy", "--continuation", "9 11 64",
        "--method", "saliency", "--node", "transformer.h.0", "--aggregate", "l2",
        "--out", "t.npz", "--address", lm_served.address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = lm_client.attribute_tokens(
        "lm-gpt2",
        [5, 17, 3, 42, 8, 23],
        [9, 11, 64],
        method="saliency",
        node="transformer.h.0",
        aggregate="l2",
    )
    with np.load(tmp_path / "t.npz") as saved:
        np.testing.assert_array_equal(saved["scores"], expected.scores)
    assert "saliency (l2 over the hidden dimension)" in result.stdout


def test_attribute_tokens_of_an_encoder_s_output(
    lm_served: LanguageServed, lm_client: Client, tmp_path: Path
) -> None:
    ids = "101,2023,2003,1037,3231,102"
    result = gradtap(
        "attribute-tokens", "lm-minilm", "--prompt", ids, "--objective", "logit:7",
        "--position", "0", "--objective-output", "last_hidden_state", "--n-steps", "8",
        "--out", "t.npz", "--address", lm_served.address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = lm_client.attribute_tokens(
        "lm-minilm",
        [int(t) for t in ids.split(",")],
        objective=Objective.logit(7, position=0, output="last_hidden_state"),
        n_steps=8,
    )
    with np.load(tmp_path / "t.npz") as saved:
        assert "continuation" not in saved.files
        np.testing.assert_array_equal(saved["scores"], expected.scores)
    assert "logit at output last_hidden_state" in result.stdout


def test_attribute_tokens_shows_the_first_continuation_tokens_and_saves_them_all(
    lm_served: LanguageServed, tmp_path: Path
) -> None:
    continuation = ",".join(str(t) for t in range(20, 33))  # 13 tokens
    result = gradtap(
        "attribute-tokens", "lm-gpt2", "--prompt", PROMPT, "--continuation", continuation,
        "--method", "saliency", "--aggregate", "l2", "--out", "t.npz",
        "--address", lm_served.address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("POS"))
    assert len(header.split()) == 2 + 12
    assert "(the first 12 of 13 continuation tokens; --out has all)" in result.stdout
    with np.load(tmp_path / "t.npz") as saved:
        assert saved["scores"].shape == (13, 6)


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        ([], "--continuation"),
        (["--continuation", "9", "--objective", "sum"], "--objective"),
        (["--continuation", "9,x"], "--continuation"),
        (["--continuation", "9", "--integration-method", "simpson"], "--integration-method"),
    ],
)
def test_attribute_tokens_says_what_is_missing_or_malformed(
    lm_served: LanguageServed, arguments: list[str], option: str
) -> None:
    result = gradtap(
        "attribute-tokens", "lm-gpt2", "--prompt", PROMPT, *arguments,
        "--address", lm_served.address,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for '{option}'" in result.stderr


def test_attribution_patching_saves_what_the_client_returns(
    lm_served: LanguageServed, lm_client: Client, files: Path
) -> None:
    targets = ["transformer.h.0", "transformer.h.1.attn"]
    result = gradtap(
        "attribution-patching", "lm-gpt2", "--clean", "ids.npy", "--clean", "mask.npy",
        "--corrupt", "corrupt.npy", "--corrupt", "mask.npy",
        "--objective", "logit_diff:11,12/13,14", "-t", targets[0], "-t", targets[1],
        "--out", "p.npz", "--address", lm_served.address, cwd=files,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    mask = np.ones_like(IDS)
    expected = lm_client.attribution_patching(
        "lm-gpt2",
        [IDS, mask],
        [np.load(files / "corrupt.npy"), mask],
        Objective.logit_diff([11, 12], [13, 14]),
        targets,
    )
    with np.load(files / "p.npz") as saved:
        assert sorted(saved.files) == sorted(["loss", *(f"patching/{t}" for t in targets)])
        for target in targets:
            np.testing.assert_array_equal(saved[f"patching/{target}"], expected.patching[target])
            assert saved[f"patching/{target}"].shape == IDS.shape
        assert float(saved["loss"]) == expected.loss
    assert f"{expected.loss:.6g}" in result.stdout
    whole = gradtap(
        "attribution-patching", "lm-gpt2", "--clean", "ids.npy", "--clean", "mask.npy",
        "--corrupt", "corrupt.npy", "--corrupt", "mask.npy",
        "--objective", "logit_diff:11,12/13,14", "-t", targets[0], "--whole",
        "--out", "whole.npz", "--address", lm_served.address, cwd=files,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    expected_whole = lm_client.attribution_patching(
        "lm-gpt2",
        [IDS, mask],
        [np.load(files / "corrupt.npy"), mask],
        Objective.logit_diff([11, 12], [13, 14]),
        targets[0],
        reduce_hidden=False,
    )
    with np.load(files / "whole.npz") as saved:
        np.testing.assert_array_equal(
            saved[f"patching/{targets[0]}"], expected_whole.patching[targets[0]]
        )
        assert saved[f"patching/{targets[0]}"].shape == (*IDS.shape, 32)


def test_attribute_tokens_draws_the_scores(lm_served: LanguageServed, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = gradtap(
        "attribute-tokens", "lm-gpt2", "--prompt", PROMPT, "--continuation", CONTINUATION,
        "--method", "input_x_gradient", "--plot", "t.png",
        "--address", lm_served.address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote a picture to {Path('t.png')}" in result.stdout
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perturb_follows_a_contrastive_objective_on_a_classifier(
    client: Client, address: str, tmp_path: Path
) -> None:
    # logit_diff on a site shaped (N, C) reads no position: --position none says so.
    x = np.random.default_rng(8).standard_normal((2, 784)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = gradtap(
        "perturb", "seed-mlp", "-i", "x.npy", "--objective", "logit_diff:3/5",
        "--position", "none", "--epsilon", "0.05", "--out", "a.npz", "--address", address,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = client.perturb(
        "seed-mlp", x, "fgsm", Objective.logit_diff(3, 5, position=None), epsilon=0.05
    )
    with np.load(tmp_path / "a.npz") as saved:
        np.testing.assert_array_equal(saved["adversarial"], expected.adversarial)
        assert float(saved["objective_after"]) == expected.objective_after
    assert expected.objective_after > expected.objective_before

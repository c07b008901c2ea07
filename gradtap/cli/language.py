"""`gradtap attribute-tokens` and `gradtap attribution-patching`: the questions asked of
language models, one request each."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ._client import Objective, Result, TokenAttributionResult
from .arrays import load_npy, save_npz
from .objectives import ObjectiveOptions, describe_objective, parse_objective
from .options import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    OBJECTIVE_SPECS,
    Address,
    Digest,
    ObjectiveNode,
    ObjectiveOutput,
    Position,
    Timeout,
    Token,
    checked_out,
    connect,
    out_option,
    output_choice,
    plot_option,
    usage,
)
from .show import table, tensors_table

COLUMNS = 12
"""How many continuation tokens the printed table shows; --out holds them all."""


class TokenMethod(str, Enum):
    """attribute_tokens' methods, named as Captum's."""

    saliency = "saliency"
    input_x_gradient = "input_x_gradient"
    integrated_gradients = "integrated_gradients"


class Aggregate(str, Enum):
    """How a node's hidden dimensions become one score per token."""

    sum = "sum"
    l2 = "l2"


def token_ids(text: str, option: str) -> np.ndarray:
    """IDS: comma- or space-separated token ids, or an .npy file holding them."""
    if text.strip().endswith(".npy"):
        path = Path(text.strip())
        if not path.is_file():
            usage(f"file {path} does not exist", option)
        array = load_npy(path, option)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            usage(f"{path} holds {array.dtype} {array.shape}, not a row of token ids", option)
        return array.astype(np.int64)
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        usage(f"{text!r} is not token ids, e.g. 464,2068,7586 or ids.npy", option)
    if not values:
        usage("give at least one token id", option)
    return np.asarray(values, dtype=np.int64)


def _number(value: float) -> str:
    return f"{value:.4g}"


def token_table(result: TokenAttributionResult) -> str:
    """One row per prompt token, one column per continuation token (at most COLUMNS): the
    score of each prompt token for each continuation token, under each one's log-probability."""
    scores = result.scores
    columns = min(scores.shape[0], COLUMNS)
    if result.continuation is None:
        heads, values = ["objective"], ["value"]
    else:
        named = result.continuation_tokens or [str(int(t)) for t in result.continuation]
        heads = [f"->{name}" for name in named[:columns]]
        values = ["log p"]
    rows = [["POS", "PROMPT", *heads]]
    rows.append(["", values[0], *(_number(v) for v in result.values[:columns])])
    prompt = result.prompt_tokens or [str(int(t)) for t in result.prompt]
    for p, token in enumerate(prompt):
        rows.append([str(p), token, *(_number(s) for s in scores[:columns, p])])
    shown = table(rows)
    if columns < scores.shape[0]:
        shown += f"\n(the first {columns} of {scores.shape[0]} continuation tokens; --out has all)"
    return shown


def attribute_tokens(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="The model's name, as `gradtap models` lists it.")
    ],
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt",
            metavar="IDS",
            help="The prompt's token ids: comma-separated (5,17,3) or an .npy file; with "
            "--text, the prompt's text.",
            show_default=False,
        ),
    ],
    continuation: Annotated[
        str | None,
        typer.Option(
            "--continuation",
            metavar="IDS",
            help="The continuation's token ids, each one's log-probability (given the tokens "
            "before it) attributed to the prompt's tokens (with --text, its text). Without "
            "one, --objective is.",
            show_default=False,
        ),
    ] = None,
    text: Annotated[
        bool,
        typer.Option(
            "--text",
            help="Read --prompt and --continuation as text, which the server tokenizes with "
            "the tokenizer the model's archive carries (`gradtap describe` says if it does).",
        ),
    ] = False,
    method: Annotated[
        TokenMethod, typer.Option("--method", help="The attribution method.")
    ] = TokenMethod.integrated_gradients,
    node: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="The node attributed to, shaped (N, S, ...) (see `gradtap describe`); by "
            "default the token embedding.",
        ),
    ] = None,
    aggregate: Annotated[
        Aggregate,
        typer.Option(
            help="sum over the node's hidden dimensions (Captum's) or l2, their L2 norm "
            "(use l2 for saliency on a LayerNorm model)."
        ),
    ] = Aggregate.sum,
    n_steps: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="integrated_gradients: the steps [50]."),
    ] = None,
    integration_method: Annotated[
        str | None,
        typer.Option(
            metavar="RULE",
            help="integrated_gradients: Captum's integration rule (its method), e.g. "
            "riemann_trapezoid [gausslegendre].",
            show_default=False,
        ),
    ] = None,
    baseline_token: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="ID",
            help="integrated_gradients: the token every prompt position takes at the baseline [0].",
        ),
    ] = None,
    internal_batch_size: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="Rows per pass; the server chooses by default."),
    ] = None,
    objective_spec: Annotated[
        str | None,
        typer.Option(
            "--objective",
            metavar="SPEC",
            help=f"Without --continuation, the scalar attributed: {OBJECTIVE_SPECS}.",
            show_default=False,
        ),
    ] = None,
    objective_output: ObjectiveOutput = "0",
    objective_node: ObjectiveNode = None,
    position: Position = None,
    digest: Digest = None,
    out: Annotated[
        Path | None, out_option("scores (continuation x prompt), values, prompt, continuation")
    ] = None,
    plot: Annotated[Path | None, plot_option("the scores of the prompt's tokens.")] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """Attribute each continuation token's log-probability to each prompt token.

    As Captum's LLMGradientAttribution, in one request. Prints one row per prompt token and
    one column per continuation token, under each continuation token's log-probability.

    \b
    Example, with a language model served (see docs/language-models.md):
      gradtap attribute-tokens gpt2 --prompt 5,17,3,42 --continuation 9,11 \\
          --method integrated_gradients --n-steps 32 --out tokens.npz
      gradtap attribute-tokens tiny-gpt2 --text --prompt "the capital of france is" \\
          --continuation paris --plot tokens.png
    """
    prompt_ids: str | np.ndarray = prompt if text else token_ids(prompt, "--prompt")
    continuation_ids: str | np.ndarray | None = continuation
    if continuation is not None and not text:
        continuation_ids = token_ids(continuation, "--continuation")
    objective = None
    if objective_spec is not None:
        if continuation_ids is not None:
            usage("give --continuation or --objective, not both", "--objective")
        objective = parse_objective(
            objective_spec,
            output_choice(objective_output, "--objective-output"),
            objective_node,
            ObjectiveOptions(position),
        )
    elif continuation_ids is None:
        usage("what is attributed? give --continuation IDS (or --objective SPEC)", "--continuation")
    checked_out(out)
    with connect(address, token, timeout) as client:
        try:
            result = client.attribute_tokens(
                model,
                prompt_ids,
                continuation_ids,
                method=method.value,
                node=node,
                aggregate=aggregate.value,
                objective=objective,
                n_steps=n_steps,
                integration_method=integration_method,
                baseline_token=baseline_token,
                internal_batch_size=internal_batch_size,
                digest=digest,
            )
        except ValueError as e:  # the one argument the client checks: the integration rule
            usage(str(e), "--integration-method")
    meta = result.metadata
    about = [
        ["model", meta["model"]],
        ["method", f"{meta['method']} ({meta['aggregate']} over the hidden dimension)"],
        ["attributed to", f"node {meta['node']}"],
        ["attributed", describe_objective(objective) if objective else "log p of each token"],
        ["passes", str(meta.get("passes", "?"))],
    ]
    typer.echo(table(about) + "\n\n" + token_table(result))
    if out is not None:
        arrays = {
            "scores": result.scores,
            "values": np.asarray(result.values, dtype=np.float64),
            "prompt": result.prompt,
        }
        if result.continuation is not None:
            arrays["continuation"] = result.continuation
        typer.echo(f"\nwrote {save_npz(out, arrays)} arrays to {out}")
    if plot is not None:
        try:
            written = result.plot(plot)
        except (ImportError, ValueError) as e:
            usage(str(e), "--plot")
        typer.echo(f"wrote a picture to {written}")


def attribution_patching(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="The model's name, as `gradtap models` lists it.")
    ],
    clean: Annotated[
        list[Path],
        typer.Option(
            "--clean",
            exists=True,
            dir_okay=False,
            metavar="FILE.npy",
            help="The clean input, saved with np.save; one per model input, in order.",
            show_default=False,
        ),
    ],
    corrupt: Annotated[
        list[Path],
        typer.Option(
            "--corrupt",
            exists=True,
            dir_okay=False,
            metavar="FILE.npy",
            help="The corrupted input, of the clean one's shapes; one per model input.",
            show_default=False,
        ),
    ],
    objective_spec: Annotated[
        str,
        typer.Option(
            "--objective",
            metavar="SPEC",
            help="The objective whose change is estimated, e.g. logit_diff:17/4: "
            f"{OBJECTIVE_SPECS.removesuffix(' | none')}.",
            show_default=False,
        ),
    ],
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            "-t",
            metavar="NAME",
            help="A node (a graph-node name or module path, see `gradtap describe`) whose "
            "patching estimate to return; repeatable.",
        ),
    ] = None,
    objective_output: ObjectiveOutput = "0",
    objective_node: ObjectiveNode = None,
    position: Position = None,
    whole: Annotated[
        bool,
        typer.Option(
            "--whole", help="Return each product whole, not summed over the hidden dimension."
        ),
    ] = False,
    digest: Digest = None,
    out: Annotated[Path | None, out_option("patching/NAME per target, plus loss")] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """Estimate what patching each target's corrupted activation in does to an objective.

    For each --target: (activation at corrupt - activation at clean) x the objective's gradient
    at clean, summed over the hidden dimension (one value per token): two forward passes and
    one backward pass on the server, however many targets.

    \b
    Example, with a language model served (see docs/language-models.md):
      gradtap attribution-patching gpt2 --clean ids.npy --clean mask.npy \\
          --corrupt corrupt.npy --corrupt mask.npy --objective logit_diff:17/4 \\
          --target transformer.h.0 --target transformer.h.1 --out patching.npz
    """
    if not targets:
        usage("which nodes? give at least one --target", "--target")
    objective = parse_objective(
        objective_spec,
        output_choice(objective_output, "--objective-output"),
        objective_node,
        ObjectiveOptions(position),
    )
    if objective is None:
        usage("attribution patching needs an objective, e.g. logit_diff:17/4", "--objective")
    checked_out(out)
    clean_arrays = [load_npy(path, "--clean") for path in clean]
    corrupt_arrays = [load_npy(path, "--corrupt") for path in corrupt]
    with connect(address, token, timeout) as client:
        result = client.attribution_patching(
            model,
            clean_arrays,
            corrupt_arrays,
            objective,
            targets,
            reduce_hidden=not whole,
            digest=digest,
        )
    show_patching(result, objective)
    if out is not None:
        arrays = {f"patching/{name}": array for name, array in result.patching.items()}
        count = save_npz(out, {**arrays, "loss": np.float64(result.loss)})
        typer.echo(f"\nwrote {count} arrays to {out}")


def show_patching(result: Result, objective: Objective) -> None:
    meta = result.metadata
    about = [
        ["model", str(meta.get("model", "?"))],
        ["objective", describe_objective(objective)],
        ["loss", f"{result.loss:.6g} (at the clean input)"],
    ]
    arrays = {f"patching/{name}": array for name, array in result.patching.items()}
    typer.echo(table(about) + "\n\n" + tensors_table(arrays))

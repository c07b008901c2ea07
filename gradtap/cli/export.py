"""`gradtap export`: a Hugging Face, timm, torchvision or factory model into an archive gradtap
serves. The export code needs torch (the server extra) and is imported only when the command
runs, so that the other commands never load torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import note, usage
from .show import table

SOURCES = "hf:DIRECTORY | timm:NAME | torchvision:NAME | python:MODULE:FACTORY"


def _range(text: str | None, option: str) -> tuple[int, int] | None:
    """MIN..MAX -> (MIN, MAX)."""
    if text is None:
        return None
    low, dots, high = text.partition("..")
    if not dots or not low.strip().isdigit() or not high.strip().isdigit():
        usage(f"give a range MIN..MAX, e.g. 1..64, not {text!r}", option)
    if int(low) < 1 or int(high) < int(low):
        usage(f"{text}: MIN must be at least 1 and MAX at least MIN", option)
    return int(low), int(high)


def _shape(text: str | None) -> tuple[int, ...] | None:
    """3,224,224 -> (3, 224, 224)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        usage(f"give sizes separated by commas, e.g. 3,224,224, not {text!r}", "--input-shape")
    return tuple(int(p) for p in parts)


def export(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help=f"The model: {SOURCES}.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", dir_okay=False, metavar="FILE.pt2", help="Where to write the archive."
        ),
    ],
    batch: Annotated[
        str, typer.Option(metavar="MIN..MAX", help="The batch dimension's range.")
    ] = "1..64",
    sequence: Annotated[
        str | None,
        typer.Option(
            metavar="MIN..MAX",
            help="Text models: the sequence dimension's range (by default 2 to the model's "
            "longest, or 512).",
        ),
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(
            metavar="C,H,W",
            help="One row of the input, without the batch dimension: required for "
            "python:MODULE:FACTORY, optional for image models.",
        ),
    ] = None,
    input_dtype: Annotated[
        str, typer.Option(metavar="DTYPE", help="The input's dtype (python: sources).")
    ] = "float32",
    seed: Annotated[
        int, typer.Option(metavar="N", help="Seeds random weights and the check's inputs.")
    ] = 0,
    rtol: Annotated[
        float, typer.Option(metavar="R", help="The check's relative tolerance.")
    ] = 1e-4,
    atol: Annotated[
        float, typer.Option(metavar="A", help="The check's absolute tolerance.")
    ] = 1e-5,
) -> None:
    """Export a model to an archive `gradtap serve --model-repository` serves.

    \b
    SOURCE is one of
      hf:DIRECTORY            a local Hugging Face model directory (config.json and weights),
                              or a directory holding only a config.json (random weights)
      timm:NAME               a timm model, random weights (pretrained weights are never fetched)
      torchvision:NAME        a torchvision model, random weights
      python:MODULE:FACTORY   FACTORY() returns an nn.Module; give --input-shape

    The batch (and, for text, sequence) dimensions are dynamic. Causal language models
    take position ids derived from the attention mask, so left-padded rows give what each
    row gives alone. The archive carries the directory's tokenizer files. Before writing,
    the archive is loaded in gradtap's own loader and compared with the original module.

    \b
    Example:
      gradtap export hf:./gpt2 --out models/gpt2.pt2 --sequence 2..128
    """
    if out.suffix != ".pt2":
        usage("the archive's name must end in .pt2 (the model's name is the rest)", "--out")
    kind, colon, rest = source.partition(":")
    if not colon or not rest or kind not in ("hf", "timm", "torchvision", "python"):
        usage(f"{source!r} is not one of {SOURCES}", "SOURCE")
    try:
        if TYPE_CHECKING:
            from server import export as exporter
        else:
            from gradtap.server import export as exporter
    except ImportError as e:
        typer.echo('gradtap export needs the server extra: pip install "gradtap[server]"', err=True)
        typer.echo(f"  ({e})", err=True)
        raise typer.Exit(2) from None
    options = exporter.ExportOptions(
        batch=_range(batch, "--batch") or (1, 64),
        sequence=_range(sequence, "--sequence"),
        input_shape=_shape(input_shape),
        input_dtype=input_dtype,
        seed=seed,
        rtol=rtol,
        atol=atol,
        progress=lambda message: typer.echo(message, err=True),
    )
    try:
        result = exporter.export(source, options)
    except exporter.ExportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.data)
    rows = [["", "NAME", "DTYPE", "SHAPE"], *result.signature()]
    for line in result.notes:
        note(line)
    typer.echo(
        f"wrote {out} ({len(result.data) / 1e6:.1f} MB) in {result.seconds:.1f} s: "
        f"{result.description}\n"
        f"served outputs match the module within atol {atol:g} + rtol {rtol:g} x |value| "
        f"(max |difference| {result.max_abs_diff:.3g} over {result.checked} inputs)\n" + table(rows)
    )

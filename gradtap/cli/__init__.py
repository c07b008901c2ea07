"""The gradtap command line: serve models, describe them, analyze, attribute and perturb inputs.

One module per command group (serve; models, describe and health; analyze and analyze-many;
attribute; attribute-tokens and attribution-patching; perturb; export); the options they
share are declared once, in options.py. The entry point is main(); `python -m gradtap.cli`
runs it too.
"""

from __future__ import annotations

import typer

from . import analyze, attribute, export, language, models, perturb, serve
from ._client import GradtapError

app = typer.Typer(
    name="gradtap",
    help="Activations and gradients of a PyTorch model's intermediate nodes, over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
app.command()(serve.serve)
app.add_typer(models.models_app)
app.command()(models.describe)
app.command()(analyze.analyze)
app.command("analyze-many")(analyze.analyze_many)
app.command()(models.health)
app.command()(attribute.attribute)
app.command("attribute-tokens")(language.attribute_tokens)
app.command("attribution-patching")(language.attribution_patching)
app.command()(perturb.perturb)
app.command()(export.export)


def main() -> None:
    """The `gradtap` entry point: a failed call prints its code, message and field; exit 1."""
    try:
        app(prog_name="gradtap")
    except GradtapError as e:
        typer.echo(f"error: {e.code.name}: {e.message}", err=True)
        if e.field:
            typer.echo(f"  field: {e.field}", err=True)
        if e.reason:
            typer.echo(f"  reason: {e.reason}", err=True)
        raise SystemExit(1) from None

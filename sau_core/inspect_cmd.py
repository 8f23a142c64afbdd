"""`sau inspect PATH`: what a checkpoint or diffusers folder holds, without loading its weights."""
from __future__ import annotations

import json

import click

from .cli import main


def _shown(text: str) -> str:
    """Metadata comes from the file: escape control characters so it cannot rewrite the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--skip-values", is_flag=True, help="Do not scan weights for NaN/Inf (headers only; faster).")
def inspect_command(path: str, as_json: bool, skip_values: bool) -> None:
    """Show format, architecture, components, dtypes, metadata and problems of a model at PATH
    (a .safetensors single-file checkpoint or a diffusers folder). Every file is validated; none is loaded."""
    from .model_io import inspect_model

    report = inspect_model(path, check_values=not skip_values)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(f"path:         {_shown(report['path'])}")
    click.echo(f"format:       {report['format']}")
    click.echo(f"architecture: {report['architecture']}")
    if report.get("prediction_type"):
        click.echo(f"scheduler:    {report.get('scheduler')} ({report['prediction_type']})")
    click.echo("components:")
    for name, comp in report["components"].items():
        click.echo(f"  {name:<15} {comp['class']:<28} {comp['params']:>15,} params  {comp['dtype']}")
    click.echo(f"total:        {report['params']:,} params")
    unused = report.get("unused")
    if unused and unused["tensors"]:
        click.echo(f"unused:       {unused['tensors']} tensors, {unused['params']:,} values "
                   f"(e.g. {_shown(', '.join(unused['examples'][:3]))})")
    if report["metadata"]:
        click.echo("metadata:")
        for key, value in sorted(report["metadata"].items()):
            value = _shown(value)
            click.echo(f"  {_shown(key)} = {value if len(value) <= 80 else value[:77] + '...'}")
    if report["problems"]:
        click.echo("problems:")
        for problem in report["problems"]:
            click.echo(f"  - {_shown(problem)}")
    else:
        click.echo("problems:     none found")

"""`sau`: the engine's command line. Commands live next to what they drive and register here."""
from __future__ import annotations

import functools
import sys

import click

from .errors import SauError


class SauGroup(click.Group):
    """Turns every SauError into `error: ...` and exit code 2, with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SauError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=SauGroup)
@click.version_option(package_name="sau")
def main() -> None:
    """SAU: find and remove backdoors in text-to-image diffusion models."""


def _register() -> None:
    # Imported lazily so `sau --help` stays fast and a broken optional part cannot break the others.
    from . import commands  # noqa: F401


_register()

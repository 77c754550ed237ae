"""What the command modules share: user errors as one red line, and ``--json``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


@contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the given errors into one red line and exit code 2."""
    try:
        yield
    except kinds as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


def echo(line: str) -> None:
    typer.echo(line)


def echo_json(as_json: bool, record: dict) -> bool:
    """Print ``record`` as one JSON object if ``--json`` was given; say whether it was."""
    if as_json:
        typer.echo(json.dumps(record))
    return as_json

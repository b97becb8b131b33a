"""What every `sluice` command shares: the settings, and errors as one line and an exit code.

app.py, data.py and service.py import this; none of them imports another
command module (app.py only registers theirs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NoReturn

import typer

from ..errors import ExitCode, SluiceError, report
from ..settings import Settings


def settings_from_env(**overrides: Any) -> Settings:
    """The settings of this command: SLUICE_* from the environment, then its options."""
    return Settings.from_env(os.environ, **overrides)


def fail(message: str, code: int = ExitCode.FAILED) -> NoReturn:
    typer.echo(f"sluice: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A SluiceError inside becomes its one line on stderr and its exit code."""
    try:
        yield
    except SluiceError as err:
        raise typer.Exit(report(err)) from None

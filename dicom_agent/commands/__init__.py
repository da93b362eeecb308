"""Command modules of ``cxr-agent``; each registers its commands on ``dicom_agent.cli.app``."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line on stderr and exit with ``code`` (never a traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)

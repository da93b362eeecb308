"""Command modules of ``cxr-agent``: each holds its commands on its own ``app`` Typer, which
:mod:`dicom_agent.cli` merges into the top-level command (the modules never import the CLI)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import typer

from dicom_agent.config import AgentSettings, load_settings
from dicom_agent.errors import ConfigError

#: The ``--config`` option every command that reads settings takes.
CONFIG_OPTION = typer.Option(None, "--config", help="YAML file over the embedded defaults.")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line on stderr and exit with ``code`` (never a traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def settings_or_fail(config: Path | None) -> AgentSettings:
    """Load settings; each bad key is one ``error:`` line on stderr, then exit code 2."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        lines = str(exc).splitlines() or ["invalid configuration"]
        for line in lines[:-1]:
            typer.echo(f"error: {line}", err=True)
        fail(lines[-1])

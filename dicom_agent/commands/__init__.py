"""Command modules of ``cxr-agent``: each holds its commands on its own ``app`` Typer, which
:mod:`dicom_agent.cli` merges into the top-level command (the modules never import the CLI)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click
import typer
from typer.core import TyperOption

from dicom_agent.config import AgentSettings, load_settings
from dicom_agent.errors import ConfigError

_typed_display = TyperOption.display_type_rich


def _flag_display(self: TyperOption, ctx: click.Context) -> str | None:
    # Typer 0.29's rich help labels every boolean flag "<bool>" as if it took a value (so
    # users typed `status --json true`, which fails); a flag takes no value: show none.
    return None if self.is_flag else _typed_display(self, ctx)


TyperOption.display_type_rich = _flag_display  # type: ignore[method-assign]

#: The ``--config`` option every command that reads settings takes.
CONFIG_OPTION = typer.Option(None, "--config", help="YAML file over the embedded defaults.")
#: ``--profile`` of the commands that audit with a chosen profile or the configured one.
PROFILE_OPTION = typer.Option(None, "--profile", help="Model profile (default: grounding.profile).")
#: ``--parser`` of the commands that audit drafts.
PARSER_OPTION = typer.Option(None, "--parser", help="Draft parser (default: drafts.parser).")
#: ``--batch-size`` of the commands that audit many studies.
BATCH_SIZE_OPTION = typer.Option(None, "--batch-size", min=1, help="Default: worker.batch_size.")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line on stderr and exit with ``code`` (never a traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def state_or_fail(settings: AgentSettings) -> Path:
    """``paths.state`` of a command that reads what an agent recorded; exit code 2 when there is
    no database yet (opening it would create an empty one)."""
    if not settings.paths.state.exists():
        fail(f"no state database at {settings.paths.state} (has the agent ever run here?)")
    return settings.paths.state


def settings_or_fail(config: Path | None) -> AgentSettings:
    """Load settings; each bad key is one ``error:`` line on stderr, then exit code 2."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        lines = str(exc).splitlines() or ["invalid configuration"]
        for line in lines[:-1]:
            typer.echo(f"error: {line}", err=True)
        fail(lines[-1])

"""The ``cxr-agent`` command line. Commands are thin: parse options, call library code.

Each group of commands lives in its own module under :mod:`dicom_agent.commands` and registers
itself on :data:`app`. An expected failure prints one line on stderr and exits non-zero; a
traceback appears only with ``--debug``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="cxr-agent",
    help="Research-only chest X-ray draft-report audit agent. Not for clinical use.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold pixels, drafts or patient names
    add_completion=False,
)

@app.command("version")
def version() -> None:
    """Print the agent version."""
    from importlib.metadata import version as _v

    typer.echo(_v("cxr-audit-agent"))


# Modules under dicom_agent.commands that register commands on ``app`` when imported.
COMMAND_MODULES = ("draft", "agent", "models", "outputs")


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"dicom_agent.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dicom_agent.commands.{name}":
                raise


_register()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

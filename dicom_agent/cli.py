"""The ``cxr-agent`` command line. Commands are thin: parse options, call library code.

Each group of commands lives in its own module under :mod:`dicom_agent.commands`, on a Typer of
its own that :data:`app` merges here; the command modules never import this one. An expected
failure prints one line on stderr and exits non-zero; a traceback appears only with ``--debug``.
"""

from __future__ import annotations

import sys

import typer

from cxr_auditor.errors import CxrAuditError
from dicom_agent.commands import (
    agent,
    demo,
    draft,
    evaluate,
    models,
    monitoring,
    outputs,
    recovery,
    replay,
    weights,
)
from dicom_agent.errors import AgentError

app = typer.Typer(
    name="cxr-agent",
    help="Research-only chest X-ray draft-report audit agent. Not for clinical use.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold pixels, drafts or patient names
    add_completion=False,
)

@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of unexpected errors."),
) -> None:
    """Research-only chest X-ray draft-report audit agent. Not for clinical use."""


@app.command("version")
def version() -> None:
    """Print the agent version."""
    from importlib.metadata import version as _v

    typer.echo(_v("cxr-audit-agent"))


for _group in (
    draft, agent, models, outputs, evaluate, replay, monitoring, recovery, weights, demo
):
    app.add_typer(_group.app)  # no name: the group's commands join the top level


def main() -> None:
    """Console entry point: expected failures become one line on stderr, exit code 2."""
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except (AgentError, CxrAuditError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last-resort boundary of the CLI
        if debug:
            raise
        print(
            f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for a traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()

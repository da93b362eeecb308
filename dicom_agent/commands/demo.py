"""``cxr-agent demo``: the whole loop on synthetic radiographs, with a stand-in grounder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dicom_agent.commands import fail

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()


@app.command("demo")
def demo(
    folder: Annotated[
        Path, typer.Option("--folder", help="Where the demo agent keeps everything (cleared first).")
    ] = Path("var/demo"),
    timeout: Annotated[
        float, typer.Option("--timeout", min=10, help="Seconds to wait for each audit.")
    ] = 180.0,
) -> None:
    """Start an agent with the stand-in grounder (not a model), send synthetic radiographs through
    a real C-STORE association, drop drafts, wait for the audits and say how to open them."""
    from dicom_agent.demo import how_to_open, run_demo
    from dicom_agent.errors import AgentError

    try:
        studies = run_demo(folder.absolute(), timeout=timeout, say=typer.echo)
    except AgentError as exc:
        fail(str(exc))
    for line in how_to_open(folder, studies):
        typer.echo(line)

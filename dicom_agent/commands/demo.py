"""``cxr-agent demo``: the whole loop on synthetic radiographs, with a stand-in grounder."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dicom_agent.commands import fail

if TYPE_CHECKING:
    from dicom_agent.demo import DemoAgent, DemoStudy

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()


def _browse(agent: DemoAgent, studies: list[DemoStudy]) -> None:
    """Say how to open the results, then keep the demo agent serving its results browser until
    Ctrl-C."""
    from dicom_agent.demo import how_to_open

    for line in how_to_open(agent.folder, studies):
        typer.echo(line)
    typer.echo(f"\nbrowse the results: {agent.browser_url}studies (Ctrl-C stops the demo agent)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        typer.echo("stopping the demo agent")


@app.command("demo")
def demo(
    folder: Annotated[
        Path, typer.Option("--folder", help="Where the demo agent keeps everything (cleared first).")
    ] = Path("var/demo"),
    timeout: Annotated[
        float, typer.Option("--timeout", min=10, help="Seconds to wait for each audit.")
    ] = 180.0,
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the agent running afterwards to browse the results.")
    ] = False,
) -> None:
    """The two-minute demo: its own agent, the stand-in grounder (not a model), synthetic images.

    Starts an agent in FOLDER, drops drafts, sends synthetic radiographs through a real C-STORE
    association, waits for the audits and says where each result is and how to open it.
    """
    from dicom_agent.demo import how_to_open, run_demo
    from dicom_agent.errors import AgentError

    try:
        studies = run_demo(folder.absolute(), timeout=timeout, say=typer.echo,
                           then=_browse if serve else None)
    except AgentError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; the demo agent was stopped", code=130)
    if not serve:  # with --serve, _browse said it before serving
        for line in how_to_open(folder.absolute(), studies):
            typer.echo(line)

"""``cxr-agent resend STUDY_UID``: queue a study's latest results for the research destinations."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from dicom_agent.commands import fail, settings_or_fail
from dicom_agent.conformance import is_valid_uid
from dicom_agent.errors import AgentError
from dicom_agent.forward import drain_outbox, queue_resend
from dicom_agent.state import JobState, StateDB

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()


@app.command("resend")
def resend(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID of an audited study.")],
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file over the embedded defaults.")
    ] = None,
    queue_only: Annotated[
        bool,
        typer.Option("--queue-only", help="Only queue; the running agent sends on its next pass."),
    ] = False,
) -> None:
    """Send the study's latest validated SR/GSPS/SC again to every research destination."""
    if not is_valid_uid(study_uid):  # PS3.5 9.1; also keeps the path inside paths.out
        fail("STUDY_UID must be a DICOM UID (digits and dots, at most 64 characters)")
    settings = settings_or_fail(config)
    db = StateDB(settings.paths.state)
    try:
        try:
            queued = queue_resend(db, settings, study_uid)
        except AgentError as exc:
            fail(str(exc))
        job_ids = queued.job_ids
        typer.echo(f"queued {len(queued.files)} objects of version {queued.result_version}"
                   f" for {len(job_ids)} destination(s)")
        if queue_only:
            return
        drain_outbox(db, settings, time.time())
        jobs = [db.job(i) for i in job_ids]
    finally:
        db.close()
    failed = [j for j in jobs if j is not None and j.state != JobState.DONE.value]
    if failed:
        fail(f"{len(failed)} destination(s) failed; retries stay queued (see `cxr-agent status`)", code=1)
    typer.echo(f"delivered to {len(job_ids)} destination(s)")

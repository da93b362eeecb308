"""``cxr-agent forward retry`` and ``cxr-agent state rebuild``: bring back what failed.

``forward retry`` re-queues dead forward jobs (results that a research destination never
stored); the running agent sends them at its next outbox tick, or ``--now`` sends them here.
``state rebuild`` replaces a damaged state database: the damaged file is kept beside it under a
new name and the instance and study rows are rebuilt from the spool (the spool files are the
source of truth for what was acknowledged). It takes the agent's state-folder lock, so it never
runs beside a serving agent.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from dicom_agent.commands import CONFIG_OPTION, fail, settings_or_fail
from dicom_agent.errors import ConfigError, CorruptStateError, StateError
from dicom_agent.state import JobKind, JobState, StateDB

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()
forward_app = typer.Typer(help="The outbox of results sent to research destinations.")
state_app = typer.Typer(help="The agent's state database.")
app.add_typer(forward_app, name="forward")
app.add_typer(state_app, name="state")

#: SQLite's companion files of a WAL database; they belong to the damaged file when it moves.
_SQLITE_SIDE_FILES = ("-wal", "-shm")


def _open_or_fail(path: Path) -> StateDB:
    try:
        return StateDB(path)
    except StateError as exc:
        fail(str(exc))


@forward_app.command("retry")
def forward_retry(
    job_ids: Annotated[
        list[int] | None, typer.Argument(help="Dead forward job ids (see the listing).")
    ] = None,
    all_dead: Annotated[bool, typer.Option("--all", help="Re-queue every dead forward job.")] = False,
    now: Annotated[
        bool, typer.Option("--now", help="Send them here at once instead of by the agent.")
    ] = False,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Re-queue dead forward jobs with a fresh attempt budget; without ids, list them."""
    settings = settings_or_fail(config)
    db = _open_or_fail(settings.paths.state)
    try:
        if not job_ids and not all_dead:
            dead = db.jobs(JobState.DEAD, JobKind.FORWARD)
            for job in dead:
                destination = json.loads(job.payload or "{}").get("destination", "?")
                typer.echo(
                    f"{job.id}\t{destination}\t{job.attempts} attempts\t{job.last_error or ''}"
                )
            if dead:
                fail(f"{len(dead)} dead forward job(s); give their ids or --all", code=1)
            typer.echo("no dead forward jobs")
            return
        try:
            requeued = db.retry_dead_forward_jobs(None if all_dead else job_ids, time.time())
        except StateError as exc:
            fail(str(exc))
        typer.echo(f"re-queued {len(requeued)} forward job(s)")
        if now and requeued:
            from dicom_agent.forward import drain_outbox

            sent = drain_outbox(db, settings, time.time())
            typer.echo(f"delivered {sent} of {len(requeued)}")
            if sent < len(requeued):
                fail("some destinations failed again; see `cxr-agent forward retry`", code=1)
    finally:
        db.close()


def _move_aside(path: Path, stamp: str) -> Path:
    """Rename the damaged database and its WAL/SHM files to ``<name>.damaged-<stamp>*``."""
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", *_SQLITE_SIDE_FILES):
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, kept.with_name(kept.name + suffix))
    return kept


@state_app.command("rebuild")
def state_rebuild(
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even though the database passes its check.")
    ] = False,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Move a damaged state database aside and rebuild it from the spool (agent stopped)."""
    from dicom_agent import spool
    from dicom_agent.agent import LOCK_FILE, StateLock

    settings = settings_or_fail(config)
    path = settings.paths.state
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = StateLock(path.parent / LOCK_FILE)
    except ConfigError as exc:
        fail(str(exc))
    try:
        if path.exists():
            try:
                StateDB(path).close()
            except CorruptStateError:
                pass  # what this command is for
            else:
                if not force:
                    fail("the state database passes its check; nothing to rebuild (--force to"
                         " rebuild anyway)", code=1)
            kept = _move_aside(path, datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
            typer.echo(f"damaged database kept as {kept}")
        db = StateDB(path)
        try:
            spool.reconcile(
                db, settings.paths.spool, max_inflated_bytes=settings.scp.max_instance_bytes
            )
            counts = db.counts()
        finally:
            db.close()
    finally:
        lock.release()
    instances = sum(counts["instances"].values())
    studies = sum(counts["studies"].values())
    typer.echo(f"rebuilt from {settings.paths.spool}: {instances} instances in {studies} studies")
    typer.echo(
        "not in the spool, so not rebuilt: drafts and job history. Studies are audited again"
        " when the agent starts; to pair drafts again, move their files from"
        f" {settings.paths.drafts / 'processed'} back into {settings.paths.drafts}"
    )

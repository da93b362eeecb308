"""``cxr-agent serve``, ``status`` and ``reaudit``: run the agent and look at its queue."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from dicom_agent.commands import CONFIG_OPTION, fail, settings_or_fail
from dicom_agent.config import AgentSettings
from dicom_agent.errors import ConfigError

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()

#: A heartbeat older than this many seconds means the agent is not running.
HEARTBEAT_STALE_SECONDS = 15.0

@app.command("serve")
def serve(config: Path | None = CONFIG_OPTION) -> None:
    """Receive studies, pair drafts and audit them until SIGTERM / Ctrl-C."""
    from dicom_agent.agent import Agent
    from dicom_agent.observe import setup_logging

    settings = settings_or_fail(config)
    setup_logging(settings.logging)
    try:
        Agent(settings).run_forever()
    except ConfigError as exc:  # folders that cannot be created, ports that are taken
        fail(str(exc))


def _read_heartbeat(settings: AgentSettings) -> dict[str, Any] | None:
    from dicom_agent.agent import heartbeat_path

    try:
        data = json.loads(heartbeat_path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_status(settings: AgentSettings, now: float | None = None) -> dict[str, Any]:
    """Status from the state DB plus the running agent's heartbeat file."""
    from dicom_agent.agent import status_counts
    from dicom_agent.state import StateDB

    now = time.time() if now is None else now
    if not settings.paths.state.exists():
        fail(f"no state database at {settings.paths.state} (has the agent ever run here?)")
    db = StateDB(settings.paths.state)
    try:
        body: dict[str, Any] = status_counts(db)
    finally:
        db.close()
    beat = _read_heartbeat(settings)
    running = (
        beat is not None
        and not beat.get("stopped")
        and now - float(beat.get("updated_at", 0)) < HEARTBEAT_STALE_SECONDS
        and _pid_alive(beat.get("pid"))
    )
    body["agent"] = {
        "running": running,
        "pid": beat.get("pid") if beat else None,
        "heartbeat_age_seconds": round(now - float(beat.get("updated_at", 0)), 1) if beat else None,
    }
    body["model"] = beat.get("model") if running and beat else {
        "profile": settings.grounding.profile, "state": "unknown (agent not running)"
    }
    if running and beat:
        body["agent"]["listener"] = beat.get("listener")
        body["agent"]["health_port"] = beat.get("health_port")
    return body


def _print_status(body: dict[str, Any]) -> None:
    agent, model, jobs = body["agent"], body["model"], body["jobs"]
    typer.echo(f"agent: {'running (pid ' + str(agent['pid']) + ')' if agent['running'] else 'not running'}")
    line = f"model: {model.get('profile')} {model.get('state')}"
    if model.get("reason"):
        line += f" ({str(model['reason']).splitlines()[0][:200]})"
    typer.echo(line)
    typer.echo("jobs: " + ", ".join(f"{k} {v}" for k, v in jobs.items()))
    typer.echo("studies: " + ", ".join(f"{k} {v}" for k, v in body["studies"].items()))
    typer.echo(f"studies waiting for a draft: {body['waiting_for_draft']}")
    typer.echo(f"orphan drafts: {body['orphan_drafts']}")
    for job in body["retrying_jobs"]:
        typer.echo(f"retrying: {job['kind']} job {job['job_id']} study {job['study']} attempts "
                   f"{job['attempts']}: {job['error']}")
    for job in body["dead_jobs"]:
        typer.echo(f"dead: {job['kind']} job {job['job_id']} study {job['study']} after {job['attempts']} "
                   f"attempts: {job['error']}")


@app.command("status")
def status(
    config: Path | None = CONFIG_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Queue depths, studies waiting for drafts, orphans, failures and the model state."""
    body = collect_status(settings_or_fail(config))
    if as_json:
        typer.echo(json.dumps(body, indent=2, default=str))
    else:
        _print_status(body)


@app.command("reaudit")
def reaudit(
    study_uid: str = typer.Argument(..., help="Study Instance UID to audit again."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Queue a new audit version of a study (a running agent picks it up)."""
    from dicom_agent.scheduler import Reason, queue_audit
    from dicom_agent.state import StateDB

    settings = settings_or_fail(config)
    if not settings.paths.state.exists():
        fail(f"no state database at {settings.paths.state}")
    db = StateDB(settings.paths.state)
    try:
        if db.study(study_uid) is None:
            fail("unknown study: no instance of it was received")
        if not db.instances_of_study(study_uid):
            fail("the study's images are gone (housekeeping.spool_retention_days); send it again")
        draft = db.current_draft(study_uid)
        job = queue_audit(db, study_uid, draft.id if draft else None, Reason.REAUDIT, time.time())
    finally:
        db.close()
    typer.echo(f"queued audit job {job.id} (result version {job.result_version})")

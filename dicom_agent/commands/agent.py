"""``cxr-agent serve``, ``status`` and ``reaudit``: run the agent and look at its queue."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from dicom_agent.commands import CONFIG_OPTION, fail, settings_or_fail, state_or_fail
from dicom_agent.config import AgentSettings
from dicom_agent.errors import ConfigError

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()

if TYPE_CHECKING:
    from dicom_agent.state import JobRow, StateDB, StudyRow

#: Characters of a UID's tail that ``status`` and ``reaudit`` show.
SHORT_UID_CHARS = 12

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


def short_uid(uid: str) -> str:
    """The tail of a UID, enough to tell studies apart on a screen (the head is the site root)."""
    return uid if len(uid) <= SHORT_UID_CHARS + 1 else "…" + uid[-SHORT_UID_CHARS:]


def _duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h04m``, ``3d02h``: an age or a wait, to the unit that matters."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0] if text and text.strip() else None


def _waits_for(
    study: StudyRow, job: JobRow | None, settings: AgentSettings, model: dict[str, Any], now: float
) -> str:
    """What a study is waiting for, in the operator's words (states: docs/operations.md)."""
    from dicom_agent.state import JobState, StudyState

    pairing = settings.pairing
    if study.state == StudyState.RECEIVING:
        left = study.last_instance_at + pairing.settle_seconds - now
        return f"more images: settles {_duration(left)} after the last one arrived, unless more come"
    if study.state == StudyState.WAITING_DRAFT:
        if pairing.no_draft_policy == "wait":
            return "a draft (pairing.no_draft_policy: wait)"
        left = (study.settled_at or now) + pairing.draft_wait_seconds - now
        return f"a draft: audited without one in {_duration(left)}"
    if study.state == StudyState.FAILED:
        error = _first_line(job.last_error if job else None) or "the audit job is dead"
        return f"nothing: its audit failed ({error}); fix it, then cxr-agent reaudit"
    if job is None:
        return "the scheduler to queue its audit"
    if job.state == JobState.WAITING_MODEL:
        return f"the model: profile {model.get('profile')} is {model.get('state')}"
    if job.state == JobState.RUNNING:
        return "the worker: being audited now"
    if job.last_error:
        return (
            f"a retry in {_duration(job.next_attempt_at - now)} (attempt {job.attempts + 1}):"
            f" {_first_line(job.last_error)}"
        )
    return "the worker: queued for audit"


def study_rows(
    db: StateDB, settings: AgentSettings, model: dict[str, Any], now: float, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` unfinished studies (not yet audited) and how many there are in all.

    One indexed page (:meth:`StateDB.studies_page`) and the state counts: never every study.
    """
    from dicom_agent.state import StudyState

    waiting = (StudyState.RECEIVING, StudyState.WAITING_DRAFT, StudyState.QUEUED, StudyState.FAILED)
    counts = db.counts()["studies"]
    studies = db.studies_page(states=waiting, limit=limit) if limit > 0 else []
    rows = []
    for study in studies:
        job = db.latest_audit_job(study.study_instance_uid)
        rows.append({
            "accession_number": study.accession_number,
            "study_instance_uid": study.study_instance_uid,
            "short_uid": short_uid(study.study_instance_uid),
            "state": study.state,
            "job_state": job.state if job else None,
            "age_seconds": round(now - study.first_instance_at, 1),
            "waits_for": _waits_for(study, job, settings, model, now),
        })
    return rows, sum(counts.get(state.value, 0) for state in waiting)


def _dead_letters(db: StateDB) -> list[dict[str, Any]]:
    """The newest dead jobs (at most STATUS_JOBS_SHOWN) with their study (accession, short UID)
    and their reason: the first line of the error, in full (the lines after it are a traceback)."""
    from dicom_agent.agent import STATUS_JOBS_SHOWN
    from dicom_agent.state import JobState

    out = []
    for job in db.recent_jobs(JobState.DEAD, STATUS_JOBS_SHOWN):
        study = db.study(job.study_instance_uid)
        out.append({
            "job_id": job.id,
            "kind": job.kind,
            "accession_number": study.accession_number if study else None,
            "short_uid": short_uid(job.study_instance_uid),
            "attempts": job.attempts,
            "reason": _first_line(job.last_error),
        })
    return out


def collect_status(
    settings: AgentSettings, now: float | None = None, limit: int = 20
) -> dict[str, Any]:
    """Status from the state DB plus the running agent's heartbeat file."""
    from dicom_agent.agent import status_counts
    from dicom_agent.state import StateDB

    now = time.time() if now is None else now
    state = state_or_fail(settings)
    beat = _read_heartbeat(settings)
    running = (
        beat is not None
        and not beat.get("stopped")
        and now - float(beat.get("updated_at", 0)) < HEARTBEAT_STALE_SECONDS
        and _pid_alive(beat.get("pid"))
    )
    body: dict[str, Any] = {
        "agent": {
            "running": running,
            "pid": beat.get("pid") if beat else None,
            "heartbeat_age_seconds": round(now - float(beat.get("updated_at", 0)), 1) if beat else None,
        },
        "model": (beat.get("model") if running and beat else None) or {
            "profile": settings.grounding.profile, "state": "unknown (agent not running)"
        },
    }
    db = StateDB(state)
    try:
        body.update(status_counts(db))
        body["study_rows"], body["unfinished_studies"] = study_rows(db, settings, body["model"], now, limit)
        if not running:  # nothing moves until an agent runs: say so on every row
            for row in body["study_rows"]:
                row["waits_for"] += " (no agent is running: start cxr-agent serve)"
        body["dead_letters"] = _dead_letters(db)
    finally:
        db.close()
    if running and beat:
        body["agent"]["listener"] = beat.get("listener")
        body["agent"]["health_port"] = beat.get("health_port")
    return body


def _print_status(body: dict[str, Any]) -> None:
    agent, model, jobs = body["agent"], body["model"], body["jobs"]
    typer.echo(f"agent: {'running (pid ' + str(agent['pid']) + ')' if agent['running'] else 'not running'}")
    line = f"model: {model.get('profile')} {model.get('state')}"
    if model.get("reason"):
        line += f": {' '.join(str(model['reason']).split())}"  # the whole reason, on one line
    typer.echo(line)
    typer.echo("jobs: " + ", ".join(f"{k} {v}" for k, v in jobs.items()))
    typer.echo("studies: " + ", ".join(f"{k} {v}" for k, v in body["studies"].items()))
    typer.echo(f"orphan drafts: {body['orphan_drafts']}")
    if body["drafts"].get("ambiguous"):
        typer.echo(f"ambiguous drafts: {body['drafts']['ambiguous']} (each one's accession number"
                   " is held by more than one study: resend it named by Study Instance UID)")
    rows = body["study_rows"]
    if rows:
        shown = f"{len(rows)} newest of {body['unfinished_studies']}" if len(rows) < body["unfinished_studies"] else "all"
        typer.echo(f"unfinished studies ({shown}):")
        typer.echo(f"  {'accession':<16} {'study':<14} {'state':<13} {'age':>7}  waits for")
        for r in rows:
            typer.echo(f"  {r['accession_number'] or '-':<16} {r['short_uid']:<14} {r['state']:<13}"
                       f" {_duration(r['age_seconds']):>7}  {r['waits_for']}")
    for job in body["dead_letters"]:
        typer.echo(f"dead letter: {job['kind']} job {job['job_id']}, accession {job['accession_number'] or '-'}"
                   f" study {job['short_uid']}, after {job['attempts']} attempts: "
                   f"{' '.join((job['reason'] or 'no reason recorded').split())}")
    if any(job["kind"] == "forward" for job in body["dead_letters"]):
        typer.echo("dead forward jobs: `cxr-agent forward retry ID...` (or --all) sends them again")


@app.command("status")
def status(
    config: Path | None = CONFIG_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    limit: int = typer.Option(20, "--studies", min=0, help="Most unfinished studies to list."),
) -> None:
    """The model state, jobs by state, each unfinished study and what it waits for, dead letters."""
    body = collect_status(settings_or_fail(config), limit=limit)
    if as_json:
        typer.echo(json.dumps(body, indent=2, default=str))
    else:
        _print_status(body)


@app.command("reaudit")
def reaudit(
    key: str = typer.Argument(..., help="Study Instance UID or Accession Number of the study."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Queue a new audit version of a study (a running agent picks it up)."""
    from dicom_agent.errors import StateError
    from dicom_agent.scheduler import reaudit_study
    from dicom_agent.state import StateDB

    db = StateDB(state_or_fail(settings_or_fail(config)))
    try:
        matches = db.studies_for_key(key)
        if not matches:
            fail("unknown study: no instance with that Study Instance UID or Accession Number was received")
        if len(matches) > 1:
            fail(f"accession number held by {len(matches)} studies ("
                 f"{', '.join(short_uid(u) for u in matches)}): give the Study Instance UID")
        (study_uid,) = matches
        matched = "Study Instance UID" if study_uid == key else f"accession number (study {short_uid(study_uid)})"
        try:
            job = reaudit_study(db, study_uid, time.time())
        except StateError as exc:
            fail(str(exc))
    finally:
        db.close()
    typer.echo(f"matched by {matched}; queued audit job {job.id} (result version {job.result_version})")

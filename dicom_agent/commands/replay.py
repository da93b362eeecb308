"""``cxr-agent replay`` and ``cxr-agent diff``: re-run spooled studies with another profile,
and compare two result folders (:mod:`dicom_agent.replay`). Research use only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.profiles import get_profile, parse_profile
from dicom_agent.commands import (
    BATCH_SIZE_OPTION,
    CONFIG_OPTION,
    PARSER_OPTION,
    fail,
    settings_or_fail,
    state_or_fail,
)
from dicom_agent.conformance import is_valid_uid
from dicom_agent.errors import AgentError
from dicom_agent.progress import print_summary, print_table, progress

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()


def _uids(values: list[str] | None) -> list[str]:
    """``--studies`` given repeatedly and/or comma-separated."""
    uids = [u.strip() for v in values or [] for u in v.split(",") if u.strip()]
    bad = sum(1 for u in uids if not is_valid_uid(u))
    if bad:
        fail(f"--studies: {bad} value(s) are not DICOM UIDs (digits and dots, at most 64)")
    return uids


@app.command("replay")
def replay(
    profile_name: Annotated[str, typer.Option("--profile", help="Profile to audit with.")],
    studies: Annotated[
        list[str] | None,
        typer.Option("--studies", help="Study Instance UIDs (repeat or comma-separate); "
                     "default: every audited study."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Result folder (default: <paths.out>/../replay/"
                     "<profile>-<UTC time>)."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Run the profile with this pinned prompt instead of its own "
                     "(a name in cxr_auditor.prompts, e.g. grounding, explain_my_xray)."),
    ] = None,
    parser_name: str | None = PARSER_OPTION,
    batch_size: int | None = BATCH_SIZE_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Audit spooled studies again with another profile or prompt into a separate folder."""
    from dicom_agent.registry import build_runner
    from dicom_agent.replay import replay_studies
    from dicom_agent.state import StateDB, StudyState

    settings = settings_or_fail(config)
    uids = _uids(studies)
    state = state_or_fail(settings)  # before a model is loaded for nothing
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_name = f"{profile_name}+{prompt}" if prompt else profile_name
    folder = out or settings.paths.out.parent / "replay" / f"{run_name}-{stamp}"
    try:
        profile = get_profile(profile_name, settings.paths.profiles)
        if prompt is not None:  # validated like a profile file, so a bad name is one line
            data = profile.model_dump(mode="json", exclude_none=True)
            profile = parse_profile({**data, "prompt": prompt}, source="--prompt")
        if profile.task == "draft_parsing":
            fail(f"profile {profile.name!r} parses drafts; give a grounding or classification one")
        runner = build_runner(profile, parser_name or settings.drafts.parser, settings)
    except CxrAuditError as exc:
        fail(str(exc).splitlines()[0])
    db = StateDB(state)
    try:
        uids = uids or [s.study_instance_uid for s in db.studies((StudyState.AUDITED,))]
        with progress("Replaying", total=len(uids)) as bar:
            report = replay_studies(
                settings, db, runner, profile, folder, uids,
                batch_size=batch_size or settings.worker.batch_size, advance=bar.advance,
            )
    except (AgentError, CxrAuditError) as exc:
        fail(str(exc).splitlines()[0])
    finally:
        runner.close()
        db.close()
    print_summary(f"replay into {folder}", report.summary())
    typer.echo(json.dumps({
        "out": str(folder), "profile": profile.name, "replayed": len(report.replayed),
        "failed": report.failed,
    }, indent=2))
    if report.failed and not report.replayed:
        raise typer.Exit(1)


@app.command("diff")
def diff(
    a: Annotated[Path, typer.Argument(help="Result folder or audit.json (before).")],
    b: Annotated[Path, typer.Argument(help="Result folder or audit.json (after).")],
) -> None:
    """Which flags and findings changed from A to B, study by study (JSON on stdout)."""
    from dicom_agent.replay import diff_folders

    try:
        summary = diff_folders(a, b)
    except AgentError as exc:
        fail(str(exc))
    body = summary.as_dict()
    print_table(
        f"{body['changed']} of {body['compared']} studies changed "
        f"({len(body['only_in_a'])} only in A, {len(body['only_in_b'])} only in B)",
        ("flag / finding", "added", "removed"),
        summary.rows(),
    )
    typer.echo(json.dumps(body, indent=2))

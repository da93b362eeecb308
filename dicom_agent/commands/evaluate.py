"""``cxr-agent eval --images DIR_OR_JSONL --truth FILE``: score a profile on labelled images.

Each truth case (:mod:`cxr_auditor.eval.grounding` documents the JSONL format) names an image,
a DICOM file or a PNG/JPEG picture, relative to ``--images`` when that is a folder, or to the
JSONL file's folder when ``--images`` is a JSONL file (which may then be the truth itself). The
images are audited one case per study, in batches, through the same loading and runner as
``cxr-agent audit``; the figures (presence per label and macro, urgent recall, localisation at
IoU 0.3 / 0.5 and mean IoU with boxes matched within each image, audit flags of labelled draft
cases, 95 % Wilson intervals) are printed as JSON on stdout and as tables on stderr.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.eval.grounding import TruthCase, TruthError, evaluate, load_truth
from cxr_auditor.labels import parse_urgent
from cxr_auditor.profiles import get_profile
from cxr_auditor.schema import DISCLAIMER, AuditResult
from dicom_agent.commands import (
    BATCH_SIZE_OPTION,
    CONFIG_OPTION,
    PARSER_OPTION,
    PROFILE_OPTION,
    fail,
    settings_or_fail,
)
from dicom_agent.config import AgentSettings
from dicom_agent.errors import AgentError
from dicom_agent.inbox import safe_name
from dicom_agent.outputs.sidecar import write_sidecar
from dicom_agent.prepare import (
    Draft,
    configured_for,
    instances_from_files,
    prepare_study,
    profile_routes,
)
from dicom_agent.progress import print_table, progress
from dicom_agent.registry import AuditRunner, build_runner

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()


def result_folder(image: str) -> str:
    """The folder of one image's results: its name when that is already a safe file name,
    else the safe name plus a hash of the path as given (``a/b.png`` and ``a_b.png`` both
    sanitise to ``a_b.png``). The same image gets the same folder in every run."""
    name = safe_name(image)
    if name == image:
        return name
    return f"{name}-{hashlib.sha256(image.encode('utf-8')).hexdigest()[:8]}"


def _cases(images: Path, truth: Path | None) -> tuple[Path, list[TruthCase]]:
    """The folder image names are relative to, and the truth cases."""
    if images.is_dir():
        if truth is None:
            fail("--truth is needed when --images is a folder")
        root = images
    elif images.is_file():
        root = images.parent
        truth = truth or images
    else:
        fail(f"--images {images}: no such folder or file")
    try:
        cases = load_truth(truth)
    except TruthError as exc:
        fail(str(exc))
    if not cases:
        fail(f"{truth.name} holds no case")
    return root, cases


def run_cases(
    cases: list[TruthCase], root: Path, runner: AuditRunner, settings: AgentSettings,
    batch_size: int,
) -> list[AuditResult]:
    """Audit every case (one image, its optional draft) in batches, with a progress bar,
    prepared as ``cxr-agent audit`` prepares a file (``settings`` configured for the profile).
    """
    results: list[AuditResult] = []
    routes = profile_routes(settings)  # read once per run, not once per case
    with progress("Evaluating", total=len(cases)) as bar:
        for start in range(0, len(cases), batch_size):
            items = []
            for case in cases[start : start + batch_size]:
                path = root / case.image
                if not path.is_file():
                    fail(f"image {case.image!r} of the truth file: no such file under {root}")
                rows, pictures, study = instances_from_files([path])
                prepared = prepare_study(rows, settings, study=study, draft=Draft(case.draft),
                                         routes=routes, pictures=pictures)
                items.append(prepared.item)
            results.extend(runner.audit_batch(items))
            bar.advance(len(items))
    return results


@app.command("eval")
def eval_command(
    images: Annotated[
        Path, typer.Option("--images", help="Folder of images, or a JSONL file of cases.")
    ],
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help="Truth JSONL (default: --images when it is JSONL)."),
    ] = None,
    profile_name: str | None = PROFILE_OPTION,
    parser_name: str | None = PARSER_OPTION,
    batch_size: int | None = BATCH_SIZE_OPTION,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Also write the JSON report to this file.")
    ] = None,
    results_dir: Annotated[
        Path | None,
        typer.Option("--results", help="Also write each image's AuditResult to "
                     "DIR/<image>/audit.json, so two runs can be compared with `cxr-agent diff` "
                     "(an image path that is not a plain file name gets a short hash of it "
                     "appended, so a/b.png and a_b.png stay apart)."),
    ] = None,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Score a profile on labelled images: JSON on stdout, tables on stderr (research only)."""
    settings = settings_or_fail(config)
    root, cases = _cases(images, truth)
    name = profile_name or settings.grounding.profile
    try:
        profile = get_profile(name, settings.paths.profiles)
        if profile.task != "grounding":
            fail(f"profile {profile.name!r} does not ground findings; eval needs one that does")
        runner = build_runner(profile, parser_name or settings.drafts.parser, settings)
    except CxrAuditError as exc:
        fail(str(exc).splitlines()[0])
    try:
        results = run_cases(
            cases, root, runner, configured_for(settings, profile),
            batch_size or settings.worker.batch_size,
        )
    except (AgentError, CxrAuditError) as exc:
        fail(str(exc).splitlines()[0])
    finally:
        runner.close()
    if results_dir is not None:
        for case, result in zip(cases, results, strict=True):
            write_sidecar(results_dir / result_folder(case.image), result)
    report = evaluate(zip(cases, results, strict=True), parse_urgent(settings.audit.urgent_labels))
    body = {
        "disclaimer": DISCLAIMER,
        "profile": profile.name,
        "parser": parser_name or settings.drafts.parser,
        "truth": (truth or images).name,
        **report.as_dict(),
    }
    text = json.dumps(body, indent=2)
    if json_out is not None:
        json_out.write_text(text + "\n", encoding="utf-8")
    for title, columns, rows in report.tables():
        print_table(title, columns, rows)
    typer.echo(text)

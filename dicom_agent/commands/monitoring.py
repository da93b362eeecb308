"""``cxr-agent monitoring``: the running agreement with signed final reports, from the state
database (:mod:`dicom_agent.finals`); the same figures as the browser's monitoring page and
``/metrics``, for a shell. Research use only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dicom_agent.commands import CONFIG_OPTION, settings_or_fail, state_or_fail
from dicom_agent.progress import print_table

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()


def _text(rate: dict[str, object]) -> str:
    value, ci, n = rate["value"], rate["ci95"], rate["n"]
    if value is None or not isinstance(ci, list):
        return "-"
    return f"{value:.3f} [{ci[0]:.2f}-{ci[1]:.2f}] n={n}"


@app.command("monitoring")
def monitoring(
    window: Annotated[
        int | None,
        typer.Option("--window", min=1, help="Agreements per profile and label "
                     "(default: monitoring.window_cases)."),
    ] = None,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Model and draft sensitivity/specificity against final reports (JSON on stdout)."""
    from dicom_agent.finals import window_summary
    from dicom_agent.state import StateDB

    settings = settings_or_fail(config)
    size = window or settings.monitoring.window_cases
    db = StateDB(state_or_fail(settings))
    try:
        body = window_summary(db.agreement_window(size), size).as_dict()
        body["finals"] = db.finals_counts()
    finally:
        db.close()
    print_table(
        f"Agreement with final reports (newest {size} per profile and label)",
        ("profile", "label", "cases", "model sens.", "model spec.", "draft sens.", "draft spec."),
        [(r["profile"], r["label"], r["cases"], _text(r["model_sensitivity"]),
          _text(r["model_specificity"]), _text(r["draft_sensitivity"]),
          _text(r["draft_specificity"])) for r in body["labels"]],
    )
    typer.echo(json.dumps(body, indent=2))

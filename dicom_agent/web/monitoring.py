"""The monitoring page: running agreement of the model's findings and the drafts with the
signed final reports (:mod:`dicom_agent.finals`), per profile and label, over the sliding
window of the newest ``monitoring.window_cases`` agreements, with 95 % Wilson intervals; the
share of flags the finals confirmed; and how many finals wait for their study's audit. Two
bounded queries: the window (ROW_NUMBER per profile and label) and the finals counts."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cxr_auditor.eval.stats import BinaryCounts
from cxr_auditor.labels import LABELS, display_name
from dicom_agent.finals import window_summary
from dicom_agent.web.context import agent_of, render

NAV: tuple[str, str] | None = ("Monitoring", "/monitoring")

_LABEL_ORDER = {label.value: i for i, label in enumerate(LABELS)}

#: Rates are shown with their interval whatever the count (the window is small by design).
_ALWAYS_INTERVAL = 10**9


def _rates(counts: BinaryCounts | None) -> tuple[str, str]:
    if counts is None:
        return "-", "-"
    return counts.recall.text(_ALWAYS_INTERVAL), counts.specificity.text(_ALWAYS_INTERVAL)


def monitoring_page(request: Request) -> Response:
    agent = agent_of(request)
    window = agent.settings.monitoring.window_cases
    summary = window_summary(agent.db.agreement_window(window), window)
    rows = []
    for key in sorted(summary.cases, key=lambda k: (k[0], _LABEL_ORDER.get(k[1], len(LABELS)))):
        model_sens, model_spec = _rates(summary.model.get(key))
        draft_sens, draft_spec = _rates(summary.draft.get(key))
        rows.append({
            "profile": key[0], "label": display_name(key[1]), "cases": summary.cases[key],
            "model_sens": model_sens, "model_spec": model_spec,
            "draft_sens": draft_sens, "draft_spec": draft_spec,
        })
    flags = [
        {"profile": p, "kind": k, "confirmed": rate.text(_ALWAYS_INTERVAL)}
        for (p, k), rate in sorted(summary.flags.items())
    ]
    finals = agent.db.finals_counts()
    return render(
        request, "monitoring.html", rows=rows, flags=flags, finals=finals, window=window,
        enabled=agent.settings.monitoring.enabled, folder=str(agent.settings.paths.finals),
    )


ROUTES = [Route("/monitoring", monitoring_page)]

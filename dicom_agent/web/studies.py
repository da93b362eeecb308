"""The studies list: newest first; filters by state, flag kind and profile; accession / UID
prefix search; keyset pages.

Each row shows the study's state, its flags as badges (URGENT first) and the profile of its
latest result, read from ``out/<study>/audit.json`` for the rows of the page only; the flag and
profile filters use the brief the worker keeps in the state DB (:meth:`StateDB.record_result`).
A page costs the same at 100,000 studies as at ten (:meth:`StateDB.studies_page`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cxr_auditor.schema import FLAG_ORDER
from dicom_agent.state import DraftState, StateDB, StudyRow, StudyState
from dicom_agent.web.context import (
    agent_of,
    flag_counts,
    latest_result,
    render,
    result_profile,
)

NAV: tuple[str, str] | None = ("Studies", "/studies")

#: The state filter's choices: study states, plus orphan drafts (drafts with no study).
ORPHANS = "orphan_drafts"
STATE_CHOICES = [s.value for s in StudyState] + [ORPHANS]
FLAG_CHOICES = [kind.value for kind in FLAG_ORDER]


@dataclass(frozen=True)
class StudyLine:
    row: StudyRow
    flags: list[tuple[str, int]]
    profile: str | None
    version: int | None


def encode_cursor(row: StudyRow) -> str:
    """The keyset of a row as one query value (``repr`` keeps the float exact)."""
    return f"{row.first_instance_at!r}_{row.study_instance_uid}"


def decode_cursor(value: str | None) -> tuple[float, str] | None:
    if not value or "_" not in value:
        return None
    stamp, _, uid = value.partition("_")
    try:
        return float(stamp), uid
    except ValueError:
        return None


@dataclass(frozen=True)
class Filters:
    """The list's filters as given in the query string (empty: no filter)."""

    state: str | None = None
    q: str = ""
    flag: str | None = None
    profile: str | None = None

    def query(self) -> str:
        """The filters as a query string (for the paging links)."""
        return urlencode({k: v for k, v in (("state", self.state), ("q", self.q),
                                            ("flag", self.flag), ("profile", self.profile)) if v})


def page_of_studies(
    db: StateDB, filters: Filters, after: str | None, limit: int
) -> tuple[list[StudyRow], str | None]:
    """One page and the cursor of the next one (None on the last page)."""
    state = filters.state
    states = (StudyState(state),) if state in StudyState.__members__.values() else None
    rows = db.studies_page(
        states=states, prefix=filters.q or None, flag=filters.flag, profile=filters.profile,
        before=decode_cursor(after), limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1]) if more and rows else None)


def studies(request: Request) -> Response:
    agent = agent_of(request)
    params = request.query_params
    state = params.get("state") or None
    flag = params.get("flag") or None
    filters = Filters(
        state=state if state in STATE_CHOICES else None,
        q=(params.get("q") or "").strip(),
        flag=flag if flag in FLAG_CHOICES else None,
        profile=params.get("profile") or None,
    )
    limit = agent.settings.web.page_size
    context: dict[str, Any] = {
        "filters": filters, "choices": STATE_CHOICES, "flag_choices": FLAG_CHOICES,
        "profiles": agent.db.result_profiles(), "lines": [], "orphans": [],
        "next_cursor": None, "first_page": not params.get("after"),
    }
    if filters.state == ORPHANS:
        context["orphans"] = agent.db.recent_drafts(DraftState.ORPHAN, limit)
    else:
        rows, next_cursor = page_of_studies(agent.db, filters, params.get("after"), limit)
        lines = []
        for row in rows:
            result = latest_result(agent.settings, row.study_instance_uid)
            lines.append(
                StudyLine(row, flag_counts(result), result_profile(result),
                          result.result_version if result else None)
            )
        context["lines"] = lines
        context["next_cursor"] = next_cursor
    return render(request, "studies.html", **context)


ROUTES = [Route("/studies", studies)]

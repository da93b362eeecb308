"""What the pages need of the running agent, and helpers every page shares."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from cxr_auditor.render import BANNER_TEXT
from cxr_auditor.schema import FLAG_ORDER, AuditResult
from dicom_agent.config import AgentSettings
from dicom_agent.errors import OutputError
from dicom_agent.outputs.layout import SIDECAR_NAME, read_result, study_dir
from dicom_agent.state import StateDB

if TYPE_CHECKING:
    from dicom_agent.observe import Metrics
    from dicom_agent.registry import Models
    from dicom_agent.scp import Listener

TEMPLATES = Path(__file__).resolve().parent / "templates"



class AgentView(Protocol):
    """The parts of :class:`dicom_agent.agent.Agent` the web app uses."""

    settings: AgentSettings
    db: StateDB
    metrics: Metrics
    models: Models

    listener: Listener | None

    def snapshot(self) -> dict[str, Any]: ...


def agent_of(request: Request) -> AgentView:
    agent: AgentView = request.app.state.agent
    return agent


def _age(seconds: float) -> str:
    """A short human age: ``42 s``, ``7 min``, ``3 h``, ``5 d``."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 36 * 3600:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} d"


def _clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html", "svg"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["age"] = lambda ts: _age(time.time() - ts) if ts else "-"
_env.filters["clock"] = _clock
_env.globals["BANNER"] = BANNER_TEXT


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page from ``templates/`` with the banner, the navigation and ``context``."""
    nav = request.app.state.nav
    html = _env.get_template(template).render(
        request=request, nav=nav, path=request.url.path, **context
    )
    return HTMLResponse(html, status_code=status_code)


def latest_result(settings: AgentSettings, study_uid: str) -> AuditResult | None:
    """The study's current ``audit.json``, or None when there is none (or it is unreadable)."""
    try:
        return read_result(study_dir(settings, study_uid) / SIDECAR_NAME)
    except OutputError:
        return None


def flag_counts(result: AuditResult | None) -> list[tuple[str, int]]:
    """``(kind, count)`` of the result's flags, URGENT first, kinds with no flag left out."""
    if result is None:
        return []
    counts = Counter(flag.kind for flag in result.flags)
    return [(kind.value, counts[kind]) for kind in FLAG_ORDER if counts[kind]]


def result_profile(result: AuditResult | None) -> str | None:
    """The grounding (or classification) profile that produced ``result``."""
    if result is None:
        return None
    for model in result.models:
        if model.task != "draft_parsing":
            return model.profile
    return None

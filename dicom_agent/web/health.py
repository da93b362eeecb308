"""``/healthz``, ``/readyz`` and ``/metrics``: probes and Prometheus, never behind the login.

``/healthz`` is liveness: 200 while the listener, scheduler and worker run (even when the model
is unavailable: the body says so), 503 otherwise. ``/readyz`` is readiness, one check per line
with its reason: the listener is up, the state database takes a write, every data folder has
``health.min_free_bytes`` free; the model is reported (loaded or not, and why) but does not make
the agent unready, because studies are still received, paired and queued while it loads.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicom_agent.web.context import AgentView, agent_of

NAV: tuple[str, str] | None = None


def _json(body: dict[str, Any], status_code: int) -> Response:
    return Response(
        json.dumps(body, default=str, indent=1), status_code, media_type="application/json"
    )


def healthz(request: Request) -> Response:
    body = agent_of(request).snapshot()
    return _json(body, 200 if body.get("serving") else 503)


def readiness(agent: AgentView) -> dict[str, Any]:
    """The ``/readyz`` body: ``ready`` and each check with ``ok``, ``required`` and ``reason``."""
    snapshot = agent.snapshot()
    checks: dict[str, dict[str, Any]] = {}
    listener = snapshot.get("listener", {})
    checks["listener"] = {
        "ok": bool(listener.get("running")),
        "reason": f"accepting on port {listener.get('port')}"
        if listener.get("running")
        else "the DICOM listener is not running",
    }
    writable = agent.db.writable()
    checks["state_db"] = {
        "ok": writable,
        "reason": "a write transaction commits"
        if writable
        else f"cannot write {agent.settings.paths.state.name} (disk full, read-only or locked)",
    }
    floor = agent.settings.health.min_free_bytes
    for name in ("spool", "out", "state"):
        folder = agent.settings.folders()[name]
        try:
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            checks[f"disk_{name}"] = {"ok": False, "reason": f"paths.{name}: {exc.strerror}"}
            continue
        checks[f"disk_{name}"] = {
            "ok": free >= floor,
            "reason": f"{free // 2**20} MiB free, floor {floor // 2**20} MiB (health.min_free_bytes)",
        }
    for check in checks.values():
        check["required"] = True
    model = snapshot.get("model", {})
    checks["model"] = {
        "ok": model.get("state") == "ready",
        "required": False,
        "reason": f"profile {model.get('profile')} {model.get('state')}"
        + (f": {str(model['reason']).splitlines()[0][:300]}" if model.get("reason") else ""),
    }
    ready = all(c["ok"] for c in checks.values() if c["required"])
    return {"ready": ready, "checks": checks}


def readyz(request: Request) -> Response:
    body = readiness(agent_of(request))
    return _json(body, 200 if body["ready"] else 503)


def metrics(request: Request) -> Response:
    agent = agent_of(request)
    agent.metrics.refresh(agent.db)
    return Response(agent.metrics.render(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
]

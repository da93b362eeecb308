"""The queue page: depths, finished audits over the last hour (a server-drawn SVG chart),
model state and the dead letters. Every query is bounded: counts by state, one grouped count
for the chart, the newest dead jobs only."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicom_agent.state import QUEUE_TABLES, JobState, StateDB
from dicom_agent.web.context import agent_of, render

NAV: tuple[str, str] | None = ("Queue", "/queue")

WINDOW_SECONDS = 3600.0
BUCKET_SECONDS = 300.0
DEAD_SHOWN = 50


@dataclass(frozen=True)
class Bar:
    """One bucket of the chart, in SVG user units (the chart is 600 x 160)."""

    x: float
    done_height: float
    dead_height: float
    done: int
    dead: int
    label: str


def throughput_bars(db: StateDB, now: float, height: float = 120.0) -> tuple[list[Bar], int]:
    """Bars of audits done (and dead) per 5 minutes over the last hour, and the scale top."""
    buckets = int(WINDOW_SECONDS // BUCKET_SECONDS)
    since = now - WINDOW_SECONDS
    done, dead = [0] * buckets, [0] * buckets
    for (state, index), n in db.jobs_finished_per_bucket(since, BUCKET_SECONDS).items():
        # a job finished at this very instant falls one past the end: count it in the last bar
        series = done if state == JobState.DONE.value else dead
        series[min(index, buckets - 1)] += n
    top = max([d + x for d, x in zip(done, dead, strict=True)] + [1])
    width = 560.0 / buckets
    bars = []
    for i in range(buckets):
        minutes_ago = round((WINDOW_SECONDS - i * BUCKET_SECONDS) / 60)
        bars.append(Bar(
            x=30 + i * width,
            done_height=height * done[i] / top,
            dead_height=height * dead[i] / top,
            done=done[i],
            dead=dead[i],
            label=f"-{minutes_ago}",
        ))
    return bars, top


def queue_page(request: Request) -> Response:
    agent = agent_of(request)
    counts = agent.db.counts(QUEUE_TABLES)
    bars, top = throughput_bars(agent.db, time.time())
    profile = agent.settings.grounding.profile
    models = agent.models.status()
    return render(
        request, "queue.html",
        counts=counts, bars=bars, top=top,
        done_last_hour=sum(b.done for b in bars), dead_last_hour=sum(b.dead for b in bars),
        model=models.get(profile, {"profile": profile, "state": "not_loaded"}),
        models=models, dead=agent.db.recent_jobs(JobState.DEAD, DEAD_SHOWN), dead_shown=DEAD_SHOWN,
    )


ROUTES = [Route("/queue", queue_page)]

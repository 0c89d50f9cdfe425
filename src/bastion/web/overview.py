"""Overview: requests and tokens today and this month, the plan and how close the organisation
is to each limit, the busiest models."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import anyio
from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion.admission.limiter import Limiter
from bastion.web.deps import CurrentViewer, ServicesDep
from bastion.web.render import PageRoute, render
from bastion.web.usage import read_usage, summarise

router = APIRouter(route_class=PageRoute)


@dataclass(frozen=True)
class Gauge:
    """One limit: how much of it is in use right now (None: unlimited)."""

    name: str
    used: int
    limit: int | None
    unit: str

    @property
    def percent(self) -> int:
        return 0 if not self.limit else min(100, round(100 * self.used / self.limit))

    @property
    def level(self) -> str:
        return "high" if self.percent >= 90 else "mid" if self.percent >= 70 else "low"


def gauges(limiter: Limiter, viewer: CurrentViewer) -> list[Gauge]:
    """From the page's worker thread: the limiter's read runs on the event loop."""
    limits = viewer.principal.limits
    windows = anyio.from_thread.run(limiter.windows, viewer.principal)
    out = []
    for name, field, unit, window in (
            ("Concurrent requests", limits.concurrent_requests, "running", "concurrency"),
            ("Tokens this hour", limits.tokens_per_hour, "tokens", "tokens")):
        w = windows.get(window)
        used = w.limit - w.remaining if w is not None else 0
        out.append(Gauge(name, used, field, unit))
    return out


@router.get("/dashboard/", include_in_schema=False)
def overview(request: Request, viewer: CurrentViewer, services: ServicesDep) -> Response:
    now = datetime.now(timezone.utc)
    today = now.date()
    month = summarise(read_usage(services, viewer.principal, today.replace(day=1), today),
                      today.replace(day=1), today)
    return render(request, "overview.html", page="overview", today=month.days[today.isoformat()],
                  month=month.total, busiest=month.busiest("models"),
                  gauges=gauges(services.limiter, viewer),
                  limits=viewer.principal.limits, own_only=not viewer.can("admin"),
                  month_name=now.strftime("%B %Y"))

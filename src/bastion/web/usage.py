"""Usage: per day, model and key, as SVG charts and a table, for a chosen range; CSV download.
Read through services.usage, the same rule as GET /v1/usage."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion.errors import InvalidRequestError
from bastion.services import keys as key_service, usage
from bastion.services.context import Services
from bastion.services.usage import FIELDS
from bastion.tenancy.keys import Principal
from bastion.web.charts import Series, horizontal_bars, stacked_bars
from bastion.web.deps import CurrentViewer, ServicesDep
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)
MAX_DAYS = 366


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trained_tokens: int = 0  # fine-tuning jobs' tokens x epochs
    fine_tuning_jobs: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.trained_tokens

    def add(self, row: dict) -> None:
        self.requests += row["requests"]
        self.prompt_tokens += row["prompt_tokens"]
        self.completion_tokens += row["completion_tokens"]
        self.trained_tokens += row["trained_tokens"]
        self.fine_tuning_jobs += row["fine_tuning_jobs"]


@dataclass
class Summary:
    days: dict[str, Totals]
    models: dict[str, Totals] = field(default_factory=dict)
    keys: dict[str, Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)

    def busiest(self, what: str = "models", n: int = 5) -> list[tuple[str, Totals]]:
        groups = self.models if what == "models" else self.keys
        return sorted(groups.items(), key=lambda kv: -kv[1].total_tokens)[:n]


def summarise(rows: list[dict], first: date, last: date) -> Summary:
    days = {(first + timedelta(d)).isoformat(): Totals() for d in range((last - first).days + 1)}
    out = Summary(days)
    for row in rows:
        out.days.setdefault(str(row["date"]), Totals()).add(row)
        out.models.setdefault(row["model"], Totals()).add(row)
        out.keys.setdefault(row["key_id"], Totals()).add(row)
        out.total.add(row)
    return out


def span(first: date, last: date) -> tuple[datetime, datetime]:
    """[first 00:00, last+1 00:00) in UTC: the range's dates are both included."""
    return (datetime.combine(first, time(), timezone.utc),
            datetime.combine(last + timedelta(days=1), time(), timezone.utc))


def read_usage(services: Services, principal: Principal, first: date, last: date) -> list[dict]:
    """The organisation's usage over whole days, requests just made included."""
    start, end = span(first, last)
    return usage.rows(services, principal, principal.org_id, start, end)


def parse_range(request: Request) -> tuple[date, date]:
    today = datetime.now(timezone.utc).date()
    q = request.query_params
    try:
        last = date.fromisoformat(q["end"]) if q.get("end") else today
        first = date.fromisoformat(q["start"]) if q.get("start") else last - timedelta(days=29)
    except ValueError as exc:
        raise InvalidRequestError(f"Dates must look like 2026-01-31 ({exc}).") from exc
    if first > last:
        raise InvalidRequestError(f"The range starts ({first}) after it ends ({last}).")
    if (last - first).days >= MAX_DAYS:
        raise InvalidRequestError(f"Choose at most {MAX_DAYS} days (got {(last - first).days + 1}).")
    return first, last


@router.get("/dashboard/usage", include_in_schema=False)
def usage_page(request: Request, viewer: CurrentViewer, services: ServicesDep) -> Response:
    first, last = parse_range(request)
    rows = read_usage(services, viewer.principal, first, last)
    summary = summarise(rows, first, last)
    names = key_service.names(services, viewer.principal)
    labels = [d[5:] for d in summary.days]  # MM-DD
    tokens = stacked_bars(labels, [
        Series("prompt", "bar-a", [t.prompt_tokens for t in summary.days.values()]),
        Series("completion", "bar-b", [t.completion_tokens for t in summary.days.values()]),
        Series("trained", "bar-d", [t.trained_tokens for t in summary.days.values()])],
        title="Tokens per day", unit="tokens")
    requests = stacked_bars(labels, [Series("requests", "bar-c",
                                            [t.requests for t in summary.days.values()])],
                            title="Requests per day", unit="requests", height=160)
    by_model = horizontal_bars([(m, t.total_tokens) for m, t in summary.busiest("models", 20)],
                               title="Tokens per model", unit="tokens")
    by_key = horizontal_bars([(names.get(k, k), t.total_tokens)
                              for k, t in summary.busiest("keys", 20)],
                             title="Tokens per key", unit="tokens", css="bar-b")
    today = datetime.now(timezone.utc).date()
    presets = [(label, (today - timedelta(days=n - 1)).isoformat(), today.isoformat())
               for label, n in (("Today", 1), ("7 days", 7), ("30 days", 30), ("90 days", 90))]
    return render(request, "usage.html", page="usage", first=first, last=last, rows=rows,
                  summary=summary, names=names, charts={"tokens": tokens, "requests": requests,
                                                        "by_model": by_model, "by_key": by_key},
                  presets=presets, own_only=not viewer.can("admin"))


def cell(text: str) -> str:
    """A name a spreadsheet would run as a formula is quoted (CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@router.get("/dashboard/usage.csv", include_in_schema=False)
def usage_csv(request: Request, viewer: CurrentViewer, services: ServicesDep) -> Response:
    first, last = parse_range(request)
    rows = read_usage(services, viewer.principal, first, last)
    names = key_service.names(services, viewer.principal)
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["date", "model", "key_id", "key_name", *FIELDS])
    for r in rows:
        out.writerow([r["date"], cell(r["model"]), r["key_id"], cell(names.get(r["key_id"], "")),
                      *(r[f] for f in FIELDS)])
    name = f"bastion-usage-{first}-{last}.csv"
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})

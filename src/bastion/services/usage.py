"""The usage use cases, for GET /v1/usage and the dashboard's Overview and Usage pages alike:
admins see every key of their organisation, any other key its own requests only."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from bastion.errors import InvalidRequestError
from bastion.services.context import Services
from bastion.tenancy.keys import Principal
from bastion.usage.report import visible_usage

DEFAULT_SPAN_S = 30 * 86400
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "trained_tokens", "fine_tuning_jobs",
          "total_tokens")


def rows(services: Services, principal: Principal, org_id: str, start: datetime,
         end: datetime) -> list[dict[str, Any]]:
    """Usage per day, model and key in [start, end). The ledger's queue is written first, so
    that a caller reads its own requests back (blocking: call from a worker thread)."""
    services.ledger.flush(timeout=5)
    with services.sessions.begin() as s:
        return visible_usage(s, principal, org_id, start, end)


def report(services: Services, principal: Principal, *, start_time: int | None,
           end_time: int | None, org_id: str | None) -> dict[str, Any]:
    """GET /v1/usage's body: the last 30 days unless a range (epoch seconds, end exclusive) is
    given, for the caller's organisation unless another (that it can see) is named."""
    now = int(time.time())
    end = end_time if end_time is not None else now + 1
    start = start_time if start_time is not None else end - DEFAULT_SPAN_S
    if start >= end:
        raise InvalidRequestError(f"start_time ({start}) must be before end_time ({end}).",
                                  param="start_time")
    org = org_id or principal.org_id
    data = rows(services, principal, org, datetime.fromtimestamp(start, timezone.utc),
                datetime.fromtimestamp(end, timezone.utc))
    totals = {k: sum(row[k] for row in data) for k in FIELDS}
    return {"object": "list", "org_id": org, "start_time": start, "end_time": end,
            "data": data, "total": totals}

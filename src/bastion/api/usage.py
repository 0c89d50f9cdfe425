"""GET /v1/usage: an organisation's usage per day, model and key (admins: all keys; any other
key: its own usage only)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from fastapi import APIRouter, Query, Request

from bastion.api.deps import CurrentKey, SessionsDep
from bastion.errors import InvalidRequestError
from bastion.usage.report import visible_usage

router = APIRouter()
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can hold


@router.get("/v1/usage")
def get_usage(request: Request, key: CurrentKey, sessions: SessionsDep,
              start_time: int | None = Query(None, ge=0, le=MAX_EPOCH,
                                             description="epoch seconds, inclusive"),
              end_time: int | None = Query(None, ge=0, le=MAX_EPOCH,
                                           description="epoch seconds, exclusive"),
              org_id: str | None = None) -> dict:
    now = int(time.time())
    end = end_time if end_time is not None else now + 1
    start = start_time if start_time is not None else end - 30 * 86400
    if start >= end:
        raise InvalidRequestError(f"start_time ({start}) must be before end_time ({end}).",
                                  param="start_time")
    org = org_id or key.org_id
    request.app.state.ledger.flush(timeout=5)  # so a caller reads its own requests back
    with sessions.begin() as s:
        data = visible_usage(s, key, org, datetime.fromtimestamp(start, timezone.utc),
                             datetime.fromtimestamp(end, timezone.utc))
    totals = {k: sum(row[k] for row in data)
              for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    return {"object": "list", "org_id": org, "start_time": start, "end_time": end,
            "data": data, "total": totals}

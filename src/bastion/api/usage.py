"""GET /v1/usage: an organisation's usage per day, model and key (admins: all keys; any other
key: its own usage only)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from bastion.api.deps import CurrentKey, ServicesDep
from bastion.services import usage

router = APIRouter()
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can hold


@router.get("/v1/usage")
def get_usage(key: CurrentKey, services: ServicesDep,
              start_time: int | None = Query(None, ge=0, le=MAX_EPOCH,
                                             description="epoch seconds, inclusive"),
              end_time: int | None = Query(None, ge=0, le=MAX_EPOCH,
                                           description="epoch seconds, exclusive"),
              org_id: str | None = None) -> dict:
    return usage.report(services, key, start_time=start_time, end_time=end_time, org_id=org_id)

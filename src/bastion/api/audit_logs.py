"""/v1/organizations/{org_id}/audit_logs: the organisation's audit log (admin), newest first,
OpenAI's list shape and filters (`event_types[]`, `actor_ids[]`, `after`, `limit`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from bastion.api.deps import CurrentKey, ServicesDep
from bastion.protocol.audit_logs import AuditLogList
from bastion.services import audit_logs

router = APIRouter()


def _many(request: Request, name: str) -> list[str]:
    """A list parameter as OpenAI's SDKs send it (`name[]=a&name[]=b`), or repeated plainly."""
    q = request.query_params
    return [v for v in (*q.getlist(f"{name}[]"), *q.getlist(name)) if v]


@router.get("/v1/organizations/{org_id}/audit_logs", response_model=AuditLogList)
def list_audit_logs(org_id: str, request: Request, key: CurrentKey, services: ServicesDep,
                    after: str | None = None,
                    limit: int = audit_logs.DEFAULT_LIMIT) -> AuditLogList:
    return audit_logs.listing(services, key, org_id, after=after, limit=limit,
                              event_types=_many(request, "event_types"),
                              actor_ids=_many(request, "actor_ids"))

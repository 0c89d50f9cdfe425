"""Settings → Audit log: the organisation's audit events, newest first, as
GET /v1/organizations/{org_id}/audit_logs lists them (through the same service), with a filter
by event type and a link to older pages. Organisation admins only, as on the API."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion.protocol.audit_logs import AuditLog
from bastion.services import audit_logs
from bastion.services import keys as key_service
from bastion.tenancy.audit import EVENT_TYPES
from bastion.web.deps import AdminViewer, ServicesDep
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 50
CHANNELS = {"api_key": "API", "session": "Dashboard", "cli": "Command line",
            "system": "Server start"}


def row(event: AuditLog, names: dict[str, str]) -> dict[str, Any]:
    """What a table row shows: the actor by its key's name where this organisation has it,
    else by id (the server administrator's key, or one since deleted)."""
    actor = event.actor
    kind = actor.get("type", "")
    detail = actor.get(kind) or {}
    key_id = detail.get("id") or (detail.get("user") or {}).get("id")
    body = (event.model_extra or {}).get(event.type) or {}
    return {"id": event.id, "type": event.type, "at": event.effective_at,
            "channel": CHANNELS.get(kind, kind), "key_id": key_id,
            "key_name": names.get(key_id or ""),
            "server_admin": (detail.get("type") or (detail.get("user") or {}).get("type"))
            == "server_admin",
            "ip": detail.get("ip_address"), "agent": detail.get("user_agent"),
            "target": body.get("id"),
            "details": json.dumps(body.get("data") or {}, sort_keys=True, ensure_ascii=False),
            "request_id": event.request_id}


@router.get("/dashboard/audit-log", include_in_schema=False)
def audit_page(request: Request, viewer: AdminViewer, services: ServicesDep) -> Response:
    after = request.query_params.get("after") or None
    chosen = request.query_params.get("type") or ""
    kind = chosen if chosen in EVENT_TYPES else ""
    listed = audit_logs.listing(services, viewer.principal, viewer.principal.org_id,
                                after=after, limit=PAGE_SIZE,
                                event_types=[kind] if kind else None)
    names = key_service.names(services, viewer.principal)
    return render(request, "audit.html", page="audit", events=[row(e, names) for e in listed.data],
                  more=listed.has_more, after=after, types=EVENT_TYPES, chosen=kind,
                  last_id=listed.last_id)

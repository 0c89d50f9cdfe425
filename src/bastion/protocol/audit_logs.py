"""The audit log on the wire, shaped like OpenAI's admin API (GET /v1/organization/audit_logs):
`type`, `effective_at`, an `actor` and the details under a key named after the type, e.g.
{"type": "api_key.created", "api_key.created": {"id": "key-…", "data": {...}}}. Bastion's
actors are API keys: `api_key` for a call to the API, `session` for the dashboard (its user
is the key it signed in with), `cli` for the command line and `system` for the server's
first start. The presenter takes a stored row typed loosely (the wire layer imports nothing
from db/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bastion.protocol.common import epoch


class AuditLog(BaseModel):
    # the event's own key ("api_key.created": {...}) is an extra field, as OpenAI names it
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["organization.audit_log"] = "organization.audit_log"
    type: str
    effective_at: int
    organization_id: str
    actor: dict[str, Any]
    request_id: str | None = None


class AuditLogList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditLog]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


def actor_view(row: Any) -> dict[str, Any]:
    """Who acted and from where, in OpenAI's actor shape."""
    where = {"ip_address": row.ip_address, "user_agent": row.user_agent}
    kind = "server_admin" if row.actor_server_admin else "organization"
    if row.actor_type == "api_key":
        return {"type": "api_key", "api_key": {"id": row.actor_key_id, "type": kind, **where}}
    if row.actor_type == "session":
        return {"type": "session", "session": {"user": {"id": row.actor_key_id, "type": kind},
                                               **where}}
    if row.actor_type == "cli":
        return {"type": "cli", "cli": {"user_agent": row.user_agent}}
    return {"type": row.actor_type}


def audit_log_view(row: Any) -> AuditLog:
    """`row`: a db.tables.AuditEvent."""
    return AuditLog(id=row.id, type=row.type, effective_at=epoch(row.created_at) or 0,
                    organization_id=row.org_id, actor=actor_view(row),
                    request_id=row.request_id,
                    **{row.type: {"id": row.target_id, "data": dict(row.details or {})}})


def audit_log_list(rows: list[Any], has_more: bool) -> AuditLogList:
    data = [audit_log_view(r) for r in rows]
    return AuditLogList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

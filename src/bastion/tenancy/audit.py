"""The audit log: what an operator may need to account for later, recorded by the services in
the transaction of the change itself, and read back page by page.

Who acted is the Principal the services already hold. From where is the request's Origin,
which the HTTP edge puts in a contextvar (http/origin.py; the CLI sets its own), so that no
use case needs a parameter for it and a path that forgets it still records who and what."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion.db.pagination import page
from bastion.db.tables import AuditEvent, utcnow
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.tenancy.keys import Principal

# OpenAI's admin API names where it has one (api_key.*, organization.updated,
# rate_limit.updated); Bastion's own resources follow the same resource.verb pattern.
EVENT_TYPES = (
    "api_key.created", "api_key.deleted",  # deleted: revoked (the key stays, refused)
    "organization.created", "organization.updated", "organization.deleted",
    "plan.updated", "rate_limit.updated",
    "model.uploaded", "model.deleted",
    "fine_tuning.job.created", "fine_tuning.job.cancelled",
)
ActorType = Literal["api_key", "session", "cli", "system"]
CLI = "cli"  # the key id of the Principal the command line acts as
MAX_USER_AGENT = 512
MAX_FILTER_VALUES = 100


@dataclass(frozen=True)
class Origin:
    """Where a change came from: `via` is the channel (the HTTP API, a dashboard session, the
    command line) and says which kind of actor the principal is."""

    via: ActorType
    ip_address: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


origin: ContextVar[Origin | None] = ContextVar("bastion_audit_origin", default=None)


def record(session: Session, principal: Principal | None, event_type: str, org_id: str, *,
           target_id: str | None = None, details: dict[str, Any] | None = None) -> AuditEvent:
    """Add one event to `session` (committed with the change it describes). A principal of
    None is the server itself (its first start); the command line acts as key id "cli"."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown audit event type {event_type!r}")  # a programming error
    where = origin.get()
    if principal is None:
        actor: ActorType = "system"
    elif principal.key_id == CLI:
        actor = "cli"
    else:
        actor = where.via if where is not None and where.via in ("api_key", "session") \
            else "api_key"
    where = where or Origin(via=actor)
    row = AuditEvent(
        id=new_id("audit_log"), org_id=org_id, type=event_type, target_id=target_id,
        details=details or {}, actor_type=actor,
        actor_key_id=principal.key_id if principal is not None and actor != "cli" else None,
        actor_server_admin=bool(principal and principal.is_server_admin),
        ip_address=where.ip_address, user_agent=(where.user_agent or "")[:MAX_USER_AGENT] or None,
        request_id=where.request_id, created_at=utcnow())
    session.add(row)
    return row


def listing(session: Session, org_id: str, *, after: str | None, limit: int,
            event_types: list[str] | None = None,
            actor_ids: list[str] | None = None) -> tuple[list[AuditEvent], bool]:
    """One page of the organisation's events, newest first, and whether more follow."""
    for name, values in (("event_types[]", event_types), ("actor_ids[]", actor_ids)):
        if len(values or []) > MAX_FILTER_VALUES:
            raise InvalidRequestError(f"At most {MAX_FILTER_VALUES} values of {name} at once.",
                                      param=name, code="invalid_value")
    unknown = [t for t in event_types or [] if t not in EVENT_TYPES]
    if unknown:
        raise InvalidRequestError(f"Unknown event type {unknown[0][:64]!r}; the audit log records "
                                  f"{', '.join(EVENT_TYPES)}.", param="event_types[]",
                                  code="invalid_value")
    query = select(AuditEvent).where(AuditEvent.org_id == org_id)
    if event_types:
        query = query.where(AuditEvent.type.in_(event_types))
    if actor_ids:
        query = query.where(AuditEvent.actor_key_id.in_(actor_ids))
    return page(session, query, AuditEvent, after=after, limit=limit)

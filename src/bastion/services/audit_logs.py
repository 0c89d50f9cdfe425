"""Reading the audit log, for GET /v1/organizations/{org_id}/audit_logs and the dashboard's
Audit log page alike: an organisation's admins see its events (another organisation does not
exist for them: 404, as the other organisation endpoints); the server administrator also sees
those of a deleted organisation, whose last event says who deleted it. The events themselves
are written by the services that make the changes (tenancy.audit.record)."""

from __future__ import annotations

from bastion.db.tables import Organization
from bastion.errors import InvalidRequestError, NotFoundError
from bastion.protocol.audit_logs import AuditLogList, audit_log_list
from bastion.services.context import Services
from bastion.tenancy import audit, orgs
from bastion.tenancy.keys import Principal

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def listing(services: Services, principal: Principal, org_id: str, *, after: str | None = None,
            limit: int = DEFAULT_LIMIT, event_types: list[str] | None = None,
            actor_ids: list[str] | None = None) -> AuditLogList:
    """Newest first; `after` is the last id already seen (OpenAI's cursor)."""
    with services.sessions() as s:
        orgs.require_org_admin(principal, org_id)
        if principal.is_server_admin:
            if s.get(Organization, org_id) is None:
                raise NotFoundError(f"No organization '{org_id}'.", param="org_id",
                                    code="organization_not_found")
        else:
            orgs.get(s, principal, org_id)
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequestError(f"limit must be between 1 and {MAX_LIMIT} (got {limit}).",
                                      param="limit", code="invalid_value")
        rows, more = audit.listing(s, org_id, after=after, limit=limit,
                                   event_types=event_types, actor_ids=actor_ids)
        return audit_log_list(rows, more)

"""The API-key use cases, for /v1/organizations/{org_id}/api-keys, the dashboard's API Keys
page and the command line alike: organisation admins only; the raw key is returned once and
stored nowhere. Creating and revoking a key is audited in the same transaction."""

from __future__ import annotations

from sqlalchemy.orm import Session

from bastion.db.tables import ApiKey
from bastion.protocol.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyView, key_view
from bastion.services.context import Services
from bastion.tenancy import audit, orgs
from bastion.tenancy.keys import Principal, create_key, list_keys, own_key, revoke_key


def issue(s: Session, principal: Principal, org_id: str, body: ApiKeyCreate) -> tuple[ApiKey, str]:
    """A new key of `org_id` in session `s`, with its audit event (never the key itself):
    shared by the API, the dashboard and `bastion keys create`."""
    row, raw = create_key(s, org_id, body.name, permissions=list(body.permissions),
                          rate_limit=body.rate_limit)
    s.flush()
    audit.record(s, principal, "api_key.created", org_id, target_id=row.id,
                 details={"name": row.name, "permissions": list(row.permissions),
                          "rate_limit": row.rate_limit})
    return row, raw


def withdraw(s: Session, principal: Principal, org_id: str, key_id: str) -> ApiKey:
    """Revoke the key in session `s`; audited only when it was not revoked already."""
    was_revoked = (found := s.get(ApiKey, key_id)) is not None and found.revoked_at is not None
    row = revoke_key(s, principal, org_id, key_id)
    if not was_revoked:
        audit.record(s, principal, "api_key.deleted", org_id, target_id=row.id,
                     details={"name": row.name})
    return row


def create(services: Services, principal: Principal, org_id: str,
           body: ApiKeyCreate) -> ApiKeyCreated:
    with services.sessions.begin() as s:
        orgs.require_org_admin(principal, org_id)
        orgs.get(s, principal, org_id)
        row, raw = issue(s, principal, org_id, body)
        return ApiKeyCreated(**key_view(row).model_dump(), key=raw)


def listing(services: Services, principal: Principal, org_id: str) -> ApiKeyList:
    with services.sessions.begin() as s:
        orgs.require_org_admin(principal, org_id)
        orgs.get(s, principal, org_id)
        return ApiKeyList(data=[key_view(r) for r in list_keys(s, principal, org_id)])


def revoke(services: Services, principal: Principal, org_id: str, key_id: str) -> ApiKeyView:
    with services.sessions.begin() as s:
        orgs.require_org_admin(principal, org_id)
        return key_view(withdraw(s, principal, org_id, key_id))


def names(services: Services, principal: Principal) -> dict[str, str]:
    """Key id -> "name (prefix…)" for the keys whose usage this caller may see: the whole
    organisation's for an admin, its own otherwise (as GET /v1/usage)."""
    with services.sessions.begin() as s:
        rows = (list_keys(s, principal, principal.org_id) if principal.can("admin")
                else [own_key(s, principal)])
        return {r.id: f"{r.name} ({r.prefix}…)" for r in rows}

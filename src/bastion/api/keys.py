"""/v1/organizations/{org_id}/api-keys: create (shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter

from bastion.api.deps import CurrentKey, SessionsDep
from bastion.api.organizations import epoch
from bastion.db.tables import ApiKey
from bastion.protocol.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyView
from bastion.tenancy import orgs
from bastion.tenancy.keys import create_key, list_keys, revoke_key

router = APIRouter()


def view(row: ApiKey) -> ApiKeyView:
    return ApiKeyView(id=row.id, name=row.name, prefix=row.prefix, org_id=row.org_id,
                      permissions=list(row.permissions), rate_limit=row.rate_limit,
                      created_at=epoch(row.created_at), last_used_at=epoch(row.last_used_at),
                      revoked_at=epoch(row.revoked_at))


@router.post("/v1/organizations/{org_id}/api-keys", response_model=ApiKeyCreated)
def create_api_key(org_id: str, body: ApiKeyCreate, key: CurrentKey,
                   sessions: SessionsDep) -> ApiKeyCreated:
    with sessions.begin() as s:
        orgs.require_org_admin(key, org_id)
        orgs.get(s, key, org_id)
        row, raw = create_key(s, org_id, body.name, permissions=list(body.permissions),
                              rate_limit=body.rate_limit)
        s.flush()
        return ApiKeyCreated(**view(row).model_dump(), key=raw)


@router.get("/v1/organizations/{org_id}/api-keys", response_model=ApiKeyList)
def list_api_keys(org_id: str, key: CurrentKey, sessions: SessionsDep) -> ApiKeyList:
    with sessions.begin() as s:
        orgs.require_org_admin(key, org_id)
        orgs.get(s, key, org_id)
        return ApiKeyList(data=[view(r) for r in list_keys(s, key, org_id)])


@router.delete("/v1/organizations/{org_id}/api-keys/{key_id}", response_model=ApiKeyView)
def revoke_api_key(org_id: str, key_id: str, key: CurrentKey, sessions: SessionsDep) -> ApiKeyView:
    with sessions.begin() as s:
        orgs.require_org_admin(key, org_id)
        return view(revoke_key(s, key, org_id, key_id))

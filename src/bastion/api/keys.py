"""/v1/organizations/{org_id}/api-keys: create (shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter

from bastion.api.deps import CurrentKey, ServicesDep
from bastion.protocol.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyView
from bastion.services import keys

router = APIRouter()


@router.post("/v1/organizations/{org_id}/api-keys", response_model=ApiKeyCreated)
def create_api_key(org_id: str, body: ApiKeyCreate, key: CurrentKey,
                   services: ServicesDep) -> ApiKeyCreated:
    return keys.create(services, key, org_id, body)


@router.get("/v1/organizations/{org_id}/api-keys", response_model=ApiKeyList)
def list_api_keys(org_id: str, key: CurrentKey, services: ServicesDep) -> ApiKeyList:
    return keys.listing(services, key, org_id)


@router.delete("/v1/organizations/{org_id}/api-keys/{key_id}", response_model=ApiKeyView)
def revoke_api_key(org_id: str, key_id: str, key: CurrentKey, services: ServicesDep) -> ApiKeyView:
    return keys.revoke(services, key, org_id, key_id)

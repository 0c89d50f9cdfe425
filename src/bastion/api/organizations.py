"""/v1/organizations: create (server admin), list, retrieve, change plan, delete."""

from __future__ import annotations

from fastapi import APIRouter

from bastion.api.deps import CurrentKey, ServicesDep
from bastion.protocol.organizations import (OrganizationCreate, OrganizationDeleted,
                                            OrganizationList, OrganizationUpdate,
                                            OrganizationView)
from bastion.services import organizations

router = APIRouter()


@router.post("/v1/organizations", response_model=OrganizationView)
def create_organization(body: OrganizationCreate, key: CurrentKey,
                        services: ServicesDep) -> OrganizationView:
    return organizations.create(services, key, body)


@router.get("/v1/organizations", response_model=OrganizationList)
def list_organizations(key: CurrentKey, services: ServicesDep) -> OrganizationList:
    return organizations.listing(services, key)


@router.get("/v1/organizations/{org_id}", response_model=OrganizationView)
def retrieve_organization(org_id: str, key: CurrentKey, services: ServicesDep) -> OrganizationView:
    return organizations.retrieve(services, key, org_id)


@router.patch("/v1/organizations/{org_id}", response_model=OrganizationView)
def update_organization(org_id: str, body: OrganizationUpdate, key: CurrentKey,
                        services: ServicesDep) -> OrganizationView:
    return organizations.update(services, key, org_id, body)


@router.delete("/v1/organizations/{org_id}", response_model=OrganizationDeleted)
def delete_organization(org_id: str, key: CurrentKey, services: ServicesDep) -> OrganizationDeleted:
    return organizations.delete(services, key, org_id)

"""/v1/organizations: create (server admin), list, retrieve, change plan, delete."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter

from bastion.api.deps import CurrentKey, SessionsDep
from bastion.db.tables import Organization
from bastion.protocol.organizations import (LimitsView, OrganizationCreate, OrganizationList,
                                            OrganizationUpdate, OrganizationView)
from bastion.tenancy import orgs
from bastion.tenancy.plans import effective_limits

router = APIRouter()


def epoch(t: datetime | None) -> int | None:
    return int(t.timestamp()) if t is not None else None


def view(org: Organization) -> OrganizationView:
    limits = effective_limits(org.plan, org.limits_override)
    return OrganizationView(id=org.id, name=org.name, plan=org.plan,  # type: ignore[arg-type]
                            limits=LimitsView(**limits.__dict__), created_at=epoch(org.created_at))


@router.post("/v1/organizations", response_model=OrganizationView)
def create_organization(body: OrganizationCreate, key: CurrentKey,
                        sessions: SessionsDep) -> OrganizationView:
    with sessions.begin() as s:
        return view(orgs.create(s, key, body.name, body.plan))


@router.get("/v1/organizations", response_model=OrganizationList)
def list_organizations(key: CurrentKey, sessions: SessionsDep) -> OrganizationList:
    with sessions.begin() as s:
        return OrganizationList(data=[view(o) for o in orgs.visible(s, key)])


@router.get("/v1/organizations/{org_id}", response_model=OrganizationView)
def retrieve_organization(org_id: str, key: CurrentKey, sessions: SessionsDep) -> OrganizationView:
    with sessions.begin() as s:
        return view(orgs.get(s, key, org_id))


@router.patch("/v1/organizations/{org_id}", response_model=OrganizationView)
def update_organization(org_id: str, body: OrganizationUpdate, key: CurrentKey,
                        sessions: SessionsDep) -> OrganizationView:
    limits = body.limits.model_dump(exclude_unset=True) if body.limits is not None else None
    with sessions.begin() as s:
        return view(orgs.update(s, key, org_id, name=body.name, plan=body.plan, limits=limits))


@router.delete("/v1/organizations/{org_id}")
def delete_organization(org_id: str, key: CurrentKey, sessions: SessionsDep) -> dict:
    with sessions.begin() as s:
        org = orgs.delete(s, key, org_id)
        return {"id": org.id, "object": "organization", "deleted": True}

"""The organisation use cases, for /v1/organizations and the dashboard's Organisations page
alike: tenancy.orgs holds the rules (who may create, raise a plan, override limits, delete)."""

from __future__ import annotations

from bastion.db.tables import Organization
from bastion.protocol.organizations import (OrganizationCreate, OrganizationDeleted,
                                            OrganizationList, OrganizationUpdate,
                                            OrganizationView, organization_view)
from bastion.services.context import Services
from bastion.tenancy import orgs
from bastion.tenancy.keys import Principal
from bastion.tenancy.plans import effective_limits


def view(org: Organization) -> OrganizationView:
    """The organisation with its plan's limits and its overrides applied."""
    return organization_view(org, effective_limits(org.plan, org.limits_override))


def create(services: Services, principal: Principal, body: OrganizationCreate) -> OrganizationView:
    with services.sessions.begin() as s:
        return view(orgs.create(s, principal, body.name, body.plan))


def listing(services: Services, principal: Principal) -> OrganizationList:
    with services.sessions.begin() as s:
        return OrganizationList(data=[view(o) for o in orgs.visible(s, principal)])


def retrieve(services: Services, principal: Principal, org_id: str) -> OrganizationView:
    with services.sessions.begin() as s:
        return view(orgs.get(s, principal, org_id))


def update(services: Services, principal: Principal, org_id: str,
           body: OrganizationUpdate) -> OrganizationView:
    limits = body.limits.model_dump(exclude_unset=True) if body.limits is not None else None
    with services.sessions.begin() as s:
        return view(orgs.update(s, principal, org_id, name=body.name, plan=body.plan,
                                limits=limits))


def delete(services: Services, principal: Principal, org_id: str) -> OrganizationDeleted:
    with services.sessions.begin() as s:
        return OrganizationDeleted(id=orgs.delete(s, principal, org_id).id)

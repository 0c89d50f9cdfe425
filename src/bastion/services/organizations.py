"""The organisation use cases, for /v1/organizations, the dashboard's Organisations page and
the command line alike: tenancy.orgs holds the rules (who may create, raise a plan, override
limits, delete); here each change is audited in its own transaction, saying what changed."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from bastion.db.tables import Organization
from bastion.protocol.organizations import (OrganizationCreate, OrganizationDeleted,
                                            OrganizationList, OrganizationUpdate,
                                            OrganizationView, organization_view)
from bastion.services.context import Services
from bastion.tenancy import audit, orgs
from bastion.tenancy.keys import Principal
from bastion.tenancy.plans import effective_limits


def view(org: Organization) -> OrganizationView:
    """The organisation with its plan's limits and its overrides applied."""
    return organization_view(org, effective_limits(org.plan, org.limits_override))


def found(s: Session, principal: Principal, name: str, plan: str) -> Organization:
    """A new organisation in session `s`, with its audit event: the API, the dashboard and
    `bastion orgs create`."""
    org = orgs.create(s, principal, name, plan)
    audit.record(s, principal, "organization.created", org.id, target_id=org.id,
                 details={"name": org.name, "plan": org.plan})
    return org


def create(services: Services, principal: Principal, body: OrganizationCreate) -> OrganizationView:
    with services.sessions.begin() as s:
        return view(found(s, principal, body.name, body.plan))


def listing(services: Services, principal: Principal) -> OrganizationList:
    with services.sessions.begin() as s:
        return OrganizationList(data=[view(o) for o in orgs.visible(s, principal)])


def retrieve(services: Services, principal: Principal, org_id: str) -> OrganizationView:
    with services.sessions.begin() as s:
        return view(orgs.get(s, principal, org_id))


def _audit_update(s: Session, principal: Principal, org: Organization,
                  before: dict[str, Any]) -> None:
    """One event per kind of change (a name, a plan, limits), so each can be asked for on its
    own; nothing when the update changed nothing."""
    if before["name"] != org.name:
        audit.record(s, principal, "organization.updated", org.id, target_id=org.id,
                     details={"name": {"from": before["name"], "to": org.name}})
    if before["plan"] != org.plan:
        audit.record(s, principal, "plan.updated", org.id, target_id=org.id,
                     details={"from": before["plan"], "to": org.plan})
    overrides = org.limits_override or {}
    if before["limits"] != overrides:
        audit.record(s, principal, "rate_limit.updated", org.id, target_id=org.id,
                     details={"from": before["limits"], "to": dict(overrides)})


def update(services: Services, principal: Principal, org_id: str,
           body: OrganizationUpdate) -> OrganizationView:
    limits = body.limits.model_dump(exclude_unset=True) if body.limits is not None else None
    with services.sessions.begin() as s:
        current = orgs.get(s, principal, org_id)
        before = {"name": current.name, "plan": current.plan,
                  "limits": dict(current.limits_override or {})}
        org = orgs.update(s, principal, org_id, name=body.name, plan=body.plan, limits=limits)
        _audit_update(s, principal, org, before)
        return view(org)


def delete(services: Services, principal: Principal, org_id: str) -> OrganizationDeleted:
    with services.sessions.begin() as s:
        org = orgs.delete(s, principal, org_id)
        audit.record(s, principal, "organization.deleted", org.id, target_id=org.id,
                     details={"name": org.name})
        return OrganizationDeleted(id=org.id)

"""Organisations: who may see, create, change and delete them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion.db.tables import Organization, utcnow
from bastion.errors import AuthorizationError, NotFoundError
from bastion.ids import new_id
from bastion.tenancy.keys import Principal
from bastion.tenancy.plans import is_upgrade


def require_server_admin(principal: Principal, action: str) -> None:
    if not principal.is_server_admin:
        raise AuthorizationError(f"Only the server administrator can {action}.")


def require_org_admin(principal: Principal, org_id: str) -> None:
    """Admin of that organisation (or the server admin); other organisations do not exist."""
    if not principal.sees_org(org_id):
        raise NotFoundError(f"No organization '{org_id}'.", param="org_id",
                            code="organization_not_found")
    if not principal.can("admin"):
        raise AuthorizationError("This API key lacks the 'admin' permission needed for this "
                                 "endpoint.")


def create(session: Session, principal: Principal, name: str, plan: str) -> Organization:
    require_server_admin(principal, "create organizations")
    org = Organization(id=new_id("org"), name=name, plan=plan, created_at=utcnow())
    session.add(org)
    session.flush()
    return org


def visible(session: Session, principal: Principal) -> list[Organization]:
    query = select(Organization).where(Organization.deleted_at.is_(None))
    if not principal.is_server_admin:
        query = query.where(Organization.id == principal.org_id)
    return list(session.scalars(query.order_by(Organization.created_at)))


def get(session: Session, principal: Principal, org_id: str) -> Organization:
    org = session.get(Organization, org_id) if principal.sees_org(org_id) else None
    if org is None or org.deleted_at is not None:
        raise NotFoundError(f"No organization '{org_id}'.", param="org_id",
                            code="organization_not_found")
    return org


def update(session: Session, principal: Principal, org_id: str, *, name: str | None,
           plan: str | None, limits: dict[str, Any] | None) -> Organization:
    require_org_admin(principal, org_id)
    org = get(session, principal, org_id)
    if plan is not None and plan != org.plan:
        if is_upgrade(org.plan, plan):
            require_server_admin(principal, f"raise an organization's plan (from '{org.plan}' "
                                            f"to '{plan}')")
        org.plan = plan
    if limits is not None:
        require_server_admin(principal, "override an organization's limits")
        org.limits_override = {**(org.limits_override or {}), **limits} or None
    if name is not None:
        org.name = name
    return org


def delete(session: Session, principal: Principal, org_id: str) -> Organization:
    org = get(session, principal, org_id)  # another organisation does not exist: 404 first
    require_server_admin(principal, "delete organizations")
    if org_id == principal.org_id:
        raise AuthorizationError("The server administrator's own organization cannot be deleted.")
    org.deleted_at = utcnow()
    return org

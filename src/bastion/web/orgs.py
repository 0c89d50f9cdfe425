"""Organisations (the server administrator only): every organisation, create one, set its plan.
Through services.organizations, as /v1/organizations, so the API's rules hold here too."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import RedirectResponse, Response

from bastion.protocol.organizations import OrganizationCreate, OrganizationUpdate
from bastion.services import organizations
from bastion.services.context import Services
from bastion.tenancy.plans import PLAN_ORDER
from bastion.web.deps import CheckedForm, ServerAdminViewer, ServicesDep
from bastion.web.keys import explain
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)


def orgs_page(request: Request, services: Services, viewer: ServerAdminViewer, *,
              status: int = 200, error: str = "", changed: str = "") -> Response:
    listed = organizations.listing(services, viewer.principal).data
    saved = next((o for o in listed if o.id == changed), None)
    return render(request, "orgs.html", status=status, page="orgs", orgs=listed, plans=PLAN_ORDER,
                  error=error, saved=saved)


@router.get("/dashboard/orgs", include_in_schema=False)
def list_page(request: Request, viewer: ServerAdminViewer, services: ServicesDep) -> Response:
    return orgs_page(request, services, viewer, changed=request.query_params.get("changed", ""))


@router.post("/dashboard/orgs", include_in_schema=False)
def create(request: Request, viewer: ServerAdminViewer, form: CheckedForm,
           services: ServicesDep) -> Response:
    try:
        body = OrganizationCreate(name=str(form.get("name") or "").strip(),
                                  plan=str(form.get("plan") or "spark"))  # type: ignore[arg-type]
    except ValidationError as exc:
        return orgs_page(request, services, viewer, status=400, error=explain(exc))
    org_id = organizations.create(services, viewer.principal, body).id
    return RedirectResponse(f"/dashboard/orgs?changed={org_id}", status_code=303)


@router.post("/dashboard/orgs/{org_id}/plan", include_in_schema=False)
def set_plan(request: Request, org_id: str, viewer: ServerAdminViewer, form: CheckedForm,
             services: ServicesDep) -> Response:
    try:
        body = OrganizationUpdate(plan=str(form.get("plan") or ""))  # type: ignore[arg-type]
    except ValidationError as exc:
        return orgs_page(request, services, viewer, status=400, error=explain(exc))
    organizations.update(services, viewer.principal, org_id, body)
    return RedirectResponse(f"/dashboard/orgs?changed={org_id}", status_code=303)

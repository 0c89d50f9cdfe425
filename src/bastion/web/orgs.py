"""Organisations (the server administrator only): every organisation, create one, set its plan.
Through tenancy.orgs, so the API's rules hold here too."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import RedirectResponse, Response

from bastion.api.organizations import view
from bastion.protocol.organizations import OrganizationCreate, OrganizationUpdate
from bastion.tenancy import orgs
from bastion.tenancy.plans import PLAN_ORDER
from bastion.web.deps import CheckedForm, ServerAdminViewer
from bastion.web.keys import explain
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)


def orgs_page(request: Request, viewer: ServerAdminViewer, *, status: int = 200,
              error: str = "", changed: str = "") -> Response:
    with request.app.state.sessions.begin() as s:
        listed = [view(o) for o in orgs.visible(s, viewer.principal)]
    saved = next((o for o in listed if o.id == changed), None)
    return render(request, "orgs.html", status=status, page="orgs", orgs=listed, plans=PLAN_ORDER,
                  error=error, saved=saved)


@router.get("/dashboard/orgs", include_in_schema=False)
def list_page(request: Request, viewer: ServerAdminViewer) -> Response:
    return orgs_page(request, viewer, changed=request.query_params.get("changed", ""))


@router.post("/dashboard/orgs", include_in_schema=False)
def create(request: Request, viewer: ServerAdminViewer, form: CheckedForm) -> Response:
    try:
        body = OrganizationCreate(name=str(form.get("name") or "").strip(),
                                  plan=str(form.get("plan") or "spark"))  # type: ignore[arg-type]
    except ValidationError as exc:
        return orgs_page(request, viewer, status=400, error=explain(exc))
    with request.app.state.sessions.begin() as s:
        org_id = orgs.create(s, viewer.principal, body.name, body.plan).id
    return RedirectResponse(f"/dashboard/orgs?changed={org_id}", status_code=303)


@router.post("/dashboard/orgs/{org_id}/plan", include_in_schema=False)
def set_plan(request: Request, org_id: str, viewer: ServerAdminViewer,
             form: CheckedForm) -> Response:
    try:
        body = OrganizationUpdate(plan=str(form.get("plan") or ""))  # type: ignore[arg-type]
    except ValidationError as exc:
        return orgs_page(request, viewer, status=400, error=explain(exc))
    with request.app.state.sessions.begin() as s:
        orgs.update(s, viewer.principal, org_id, name=None, plan=body.plan, limits=None)
    return RedirectResponse(f"/dashboard/orgs?changed={org_id}", status_code=303)

"""Settings → API Keys: list, create (the key is shown once, in the response to the post that
made it, and stored nowhere), revoke. Organisation admins only, as on the API."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.responses import RedirectResponse, Response

from bastion.protocol.keys import ApiKeyCreate
from bastion.services import keys as key_service
from bastion.services.context import Services
from bastion.tenancy.keys import ALL_PERMISSIONS
from bastion.web.deps import AdminViewer, CheckedForm, ServicesDep
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)


def keys_page(request: Request, services: Services, viewer: AdminViewer, *, status: int = 200,
              created: str = "", created_name: str = "", error: str = "",
              form: FormData | None = None) -> Response:
    keys = key_service.listing(services, viewer.principal, viewer.principal.org_id).data
    return render(request, "keys.html", status=status, page="keys", keys=keys, created=created,
                  created_name=created_name, error=error, form=form,
                  permissions=ALL_PERMISSIONS)


def parse(form: FormData) -> ApiKeyCreate:
    """The form's fields through the API's own request model: the same rules, the same limits."""
    rate = str(form.get("rate_limit") or "").strip()
    return ApiKeyCreate(name=str(form.get("name") or "").strip(),
                        permissions=[str(p) for p in form.getlist("permissions")],
                        rate_limit=int(rate) if rate.isdigit() else (rate or None))  # type: ignore[arg-type]


def explain(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int))
    names = {"name": "Name", "permissions": "Permissions", "rate_limit": "Rate limit"}
    return f"{names.get(where, where)}: {first.get('msg', 'invalid value')}."


@router.get("/dashboard/keys", include_in_schema=False)
def list_page(request: Request, viewer: AdminViewer, services: ServicesDep) -> Response:
    return keys_page(request, services, viewer)


@router.post("/dashboard/keys", include_in_schema=False)
def create(request: Request, viewer: AdminViewer, form: CheckedForm,
           services: ServicesDep) -> Response:
    try:
        body = parse(form)
    except ValidationError as exc:
        return keys_page(request, services, viewer, status=400, error=explain(exc), form=form)
    created = key_service.create(services, viewer.principal, viewer.principal.org_id, body)
    return keys_page(request, services, viewer, created=created.key, created_name=body.name)


@router.post("/dashboard/keys/{key_id}/revoke", include_in_schema=False)
def revoke(request: Request, key_id: str, viewer: AdminViewer, form: CheckedForm,
           services: ServicesDep) -> Response:
    key_service.revoke(services, viewer.principal, viewer.principal.org_id, key_id)
    return RedirectResponse("/dashboard/keys", status_code=303)

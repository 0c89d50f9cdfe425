"""Models: what this organisation can use, as GET /v1/models lists them; with the `models`
permission, upload and delete through services.models, as /v1/models, so a model the API would
refuse is refused here with the same message."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from bastion.errors import APIError
from bastion.models.uploads import MODEL_ID
from bastion.services import models
from bastion.services.context import Services
from bastion.web.deps import (CheckedForm, Codec, CurrentViewer, ModelsViewer, ServicesDep,
                              Viewer, checked_upload)
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)


def models_page(request: Request, services: Services, viewer: Viewer, *, status: int = 200,
                error: str = "", notice: str = "", model_id: str = "") -> Response:
    listed = [(e.card, e.aliases, e.uses, e.deletable)
              for e in models.catalogue(services, viewer.principal)]
    return render(request, "models.html", status=status, page="models", models=listed,
                  error=error, notice=notice, model_id=model_id,
                  max_bytes=services.settings.max_model_bytes)


@router.get("/dashboard/models", include_in_schema=False)
async def list_page(request: Request, viewer: CurrentViewer, services: ServicesDep) -> Response:
    await models.refresh(services)  # a model another replica has just made
    notice = ""
    for what in ("uploaded", "deleted"):
        name = request.query_params.get(what, "")
        if name and (MODEL_ID.fullmatch(name) or name.startswith("ft:")) and len(name) < 300:
            notice = f"{what.capitalize()} {name}."
    return models_page(request, services, viewer, notice=notice)


@router.post("/dashboard/models", include_in_schema=False)
async def upload(request: Request, viewer: ModelsViewer, codec: Codec,
                 services: ServicesDep) -> Response:
    try:
        received = await models.receive(services, viewer.principal, request)
    except APIError as exc:  # not multipart, too large: nothing was kept
        return models_page(request, services, viewer, status=exc.status, error=exc.message)
    try:
        checked_upload(received.upload, request, codec)
    except BaseException:
        await models.discard(services, received)
        raise
    model_id = received.fields.get("model_id", "")
    try:  # upload() always discards the temporary files
        created = await models.upload(services, viewer.principal, received)
    except APIError as exc:  # the API's own refusal, e.g. a tensor's wrong shape
        return models_page(request, services, viewer, status=exc.status, error=exc.message,
                           model_id=model_id)
    return RedirectResponse(f"/dashboard/models?uploaded={created.id}", status_code=303)


@router.post("/dashboard/models/delete", include_in_schema=False)
async def delete(request: Request, viewer: ModelsViewer, form: CheckedForm,
                 services: ServicesDep) -> Response:
    """As DELETE /v1/models/{id}: refused while a fine-tuning job still needs the model."""
    try:
        deleted = await models.delete(services, viewer.principal, str(form.get("model") or ""))
    except APIError as exc:
        return models_page(request, services, viewer, status=exc.status, error=exc.message)
    return RedirectResponse(f"/dashboard/models?deleted={deleted.id}", status_code=303)

"""Models: what this organisation can use, from the catalog, as GET /v1/models lists them;
with the `models` permission, upload and delete through the API's own uploads.lifecycle, so a
model the API would refuse is refused here with the same message."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from bastion.api.models import card
from bastion.models.catalog import Deployment
from bastion.errors import APIError
from bastion.files.store import BlobStore
from bastion.files.upload import receive_upload
from bastion.models import custom as lifecycle
from bastion.models.uploads import MODEL_ID
from bastion.web.deps import CheckedForm, Codec, CurrentViewer, ModelsViewer, Viewer, checked_upload
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)


def models_page(request: Request, viewer: Viewer, *, status: int = 200, error: str = "",
                notice: str = "", model_id: str = "") -> Response:
    catalog = request.app.state.catalog
    models = [(card(d), catalog.aliases_of(d.id), uses(d), d.source != "configured")
              for d in catalog.visible(viewer.principal.org_id)]
    return render(request, "models.html", status=status, page="models", models=models,
                  error=error, notice=notice, model_id=model_id,
                  max_bytes=request.app.state.settings.max_model_bytes)


@router.get("/dashboard/models", include_in_schema=False)
async def list_page(request: Request, viewer: CurrentViewer) -> Response:
    await request.app.state.org_models.sync()  # a model another replica has just made
    notice = ""
    for what in ("uploaded", "deleted"):
        name = request.query_params.get(what, "")
        if name and (MODEL_ID.fullmatch(name) or name.startswith("ft:")) and len(name) < 300:
            notice = f"{what.capitalize()} {name}."
    return models_page(request, viewer, notice=notice)


@router.post("/dashboard/models", include_in_schema=False)
async def upload(request: Request, viewer: ModelsViewer, codec: Codec) -> Response:
    state = request.app.state
    settings = state.settings
    try:
        received = await receive_upload(request, BlobStore(settings.uploads_dir),
                                        settings.max_model_bytes)
    except APIError as exc:  # not multipart, too large: nothing was kept
        return models_page(request, viewer, status=exc.status, error=exc.message)
    try:
        checked_upload(received, request, codec)
    except BaseException:
        received.discard()
        raise
    model_id = received.fields.get("model_id", "")
    try:  # create() always discards the temporary files
        dep = await lifecycle.create(received, viewer.principal.org_id, catalog=state.catalog,
                                     sessions=state.sessions, settings=settings,
                                     org_models=state.org_models)
    except APIError as exc:  # the API's own refusal, e.g. a tensor's wrong shape
        return models_page(request, viewer, status=exc.status, error=exc.message,
                           model_id=model_id)
    return RedirectResponse(f"/dashboard/models?uploaded={dep.id}", status_code=303)


@router.post("/dashboard/models/delete", include_in_schema=False)
async def delete(request: Request, viewer: ModelsViewer, form: CheckedForm) -> Response:
    """As DELETE /v1/models/{id}: refused while a fine-tuning job still needs the model."""
    state = request.app.state
    try:
        dep = state.catalog.resolve(str(form.get("model") or ""), viewer.principal.org_id)
        await lifecycle.delete(dep, viewer.principal.org_id, sessions=state.sessions,
                               org_models=state.org_models)
    except APIError as exc:
        return models_page(request, viewer, status=exc.status, error=exc.message)
    return RedirectResponse(f"/dashboard/models?deleted={dep.id}", status_code=303)


def uses(dep: Deployment) -> list[str]:
    """What a model can be called for, from its engine's capability flags."""
    caps = dep.engine.capabilities
    return [name for name, on in (("chat", caps.chat), ("completions", caps.completion),
                                  ("embeddings", caps.embeddings), ("vision", caps.vision))
            if on]

"""Files: the organisation's uploads with their validation summary, an upload form and delete.
Through services.files, as /v1/files, so a file the API would refuse is refused here with the
same message."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from bastion.errors import APIError, ConflictError
from bastion.files.upload import receive_upload
from bastion.protocol.files import PURPOSES
from bastion.services import files
from bastion.services.context import Services
from bastion.web.deps import (CheckedForm, Codec, ServicesDep, TrainingViewer, Viewer,
                              checked_upload)
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 100


def files_page(request: Request, services: Services, viewer: Viewer, *, status: int = 200,
               error: str = "", notice: str = "", highlight: str = "",
               purpose: str = "fine-tune") -> Response:
    after = request.query_params.get("after") or None
    rows, more = files.listing(services, viewer.principal, after=after, limit=PAGE_SIZE)
    return render(request, "files.html", status=status, page="files", files=rows, more=more,
                  after=after, error=error, notice=notice, highlight=highlight,
                  purposes=PURPOSES, purpose=purpose,
                  max_bytes=services.settings.max_file_bytes)


@router.get("/dashboard/files", include_in_schema=False)
def list_page(request: Request, viewer: TrainingViewer, services: ServicesDep) -> Response:
    uploaded = request.query_params.get("uploaded", "")
    notice = ""
    if uploaded:
        try:
            found = files.retrieve(services, viewer.principal, uploaded)
            notice = f"Uploaded {found.filename} as {found.id}."
        except APIError:
            uploaded = ""
    deleted = request.query_params.get("deleted", "")
    if deleted.startswith("file-") and deleted.isascii() and len(deleted) <= 64:
        notice = f"Deleted {deleted}."
    return files_page(request, services, viewer, notice=notice, highlight=uploaded)


@router.post("/dashboard/files", include_in_schema=False)
async def upload(request: Request, viewer: TrainingViewer, codec: Codec,
                 services: ServicesDep) -> Response:
    async def again(exc: APIError, purpose: str = "fine-tune") -> Response:
        return await run_in_threadpool(lambda: files_page(
            request, services, viewer, status=exc.status, error=exc.message, purpose=purpose))

    try:
        received = await receive_upload(request, services.blobs,
                                        services.settings.max_file_bytes)
    except APIError as exc:  # not multipart, too large: nothing was kept
        return await again(exc)
    try:
        checked_upload(received, request, codec)
    except BaseException:
        received.discard()
        raise
    try:  # create() always discards the temporary files
        created = await files.create(services, viewer.principal, received)
    except APIError as exc:  # the API's own refusal, e.g. the first bad line's number
        return await again(exc, received.fields.get("purpose") or "fine-tune")
    return RedirectResponse(f"/dashboard/files?uploaded={created.id}", status_code=303)


@router.post("/dashboard/files/{file_id}/delete", include_in_schema=False)
def delete(request: Request, file_id: str, viewer: TrainingViewer, form: CheckedForm,
           services: ServicesDep) -> Response:
    """As DELETE /v1/files/{id}: the row first (refused while a job reads the file), then
    the blob."""
    try:
        files.delete(services, viewer.principal, file_id)
    except ConflictError as exc:
        return files_page(request, services, viewer, status=exc.status, error=exc.message)
    return RedirectResponse(f"/dashboard/files?deleted={file_id}", status_code=303)

"""Files: the organisation's uploads with their validation summary, an upload form and delete.
Through the files API's own services (files.upload, files.intake, files.records), so a file
the API would refuse is refused here with the same message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from bastion.api.files import store_of, view
from bastion.errors import APIError, ConflictError
from bastion.files import records
from bastion.files.intake import accept
from bastion.files.upload import receive_upload
from bastion.finetune.encode import file_checker
from bastion.protocol.files import PURPOSES, FileObject
from bastion.web.deps import CheckedForm, Codec, TrainingViewer, Viewer, checked_upload
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 100


@dataclass(frozen=True)
class FileRow:
    """A file as GET /v1/files shows it, plus what validation found (None: not validated)."""

    file: FileObject
    summary: dict[str, Any] | None


def listing(request: Request, org_id: str, after: str | None,
            purpose: str | None = None, limit: int = PAGE_SIZE) -> tuple[list[FileRow], bool]:
    with request.app.state.sessions() as s:
        rows, more = records.listing(s, org_id, purpose=purpose, after=after, limit=limit,
                                     newest_first=True)
        return [FileRow(view(r), r.summary) for r in rows], more


def files_page(request: Request, viewer: Viewer, *, status: int = 200, error: str = "",
               notice: str = "", highlight: str = "", purpose: str = "fine-tune") -> Response:
    after = request.query_params.get("after") or None
    files, more = listing(request, viewer.principal.org_id, after)
    return render(request, "files.html", status=status, page="files", files=files, more=more,
                  after=after, error=error, notice=notice, highlight=highlight,
                  purposes=PURPOSES, purpose=purpose,
                  max_bytes=request.app.state.settings.max_file_bytes)


@router.get("/dashboard/files", include_in_schema=False)
def list_page(request: Request, viewer: TrainingViewer) -> Response:
    uploaded = request.query_params.get("uploaded", "")
    notice = ""
    if uploaded:
        with request.app.state.sessions() as s:
            try:
                row = records.get(s, viewer.principal.org_id, uploaded)
                notice = f"Uploaded {row.filename} as {row.id}."
            except APIError:
                uploaded = ""
    deleted = request.query_params.get("deleted", "")
    if deleted.startswith("file-") and deleted.isascii() and len(deleted) <= 64:
        notice = f"Deleted {deleted}."
    return files_page(request, viewer, notice=notice, highlight=uploaded)


@router.post("/dashboard/files", include_in_schema=False)
async def upload(request: Request, viewer: TrainingViewer, codec: Codec) -> Response:
    settings = request.app.state.settings
    catalog = request.app.state.catalog
    store = store_of(request)

    async def again(exc: APIError, purpose: str = "fine-tune") -> Response:
        return await run_in_threadpool(lambda: files_page(
            request, viewer, status=exc.status, error=exc.message, purpose=purpose))

    try:
        received = await receive_upload(request, store, settings.max_file_bytes)
    except APIError as exc:  # not multipart, too large: nothing was kept
        return await again(exc)
    try:
        checked_upload(received, request, codec)
        try:
            row = await accept(received, org_id=viewer.principal.org_id, store=store,
                               sessions=request.app.state.sessions,
                               checker=lambda: file_checker(catalog, settings))
        except APIError as exc:  # the API's own refusal, e.g. the first bad line's number
            return await again(exc, received.fields.get("purpose") or "fine-tune")
    finally:
        received.discard()
    return RedirectResponse(f"/dashboard/files?uploaded={row.id}", status_code=303)


@router.post("/dashboard/files/{file_id}/delete", include_in_schema=False)
def delete(request: Request, file_id: str, viewer: TrainingViewer,
           form: CheckedForm) -> Response:
    """As DELETE /v1/files/{id}: the row first (refused while a job reads the file), then
    the blob."""
    try:
        with request.app.state.sessions.begin() as s:
            row = records.remove(s, viewer.principal.org_id, file_id)
    except ConflictError as exc:
        return files_page(request, viewer, status=exc.status, error=exc.message)
    store_of(request).delete(row.storage_key)
    return RedirectResponse(f"/dashboard/files?deleted={file_id}", status_code=303)

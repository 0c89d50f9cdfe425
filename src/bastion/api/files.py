"""/v1/files: upload (multipart, streamed to disk), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from bastion.api.deps import CatalogDep, SessionsDep, SettingsDep, require
from bastion.api.organizations import epoch
from bastion.db.tables import File
from bastion.files import records
from bastion.files.intake import accept
from bastion.files.store import BlobStore
from bastion.files.upload import receive_upload
from bastion.finetune.encode import file_checker
from bastion.protocol.files import FileDeleted, FileList, FileObject
from bastion.tenancy.keys import Principal

router = APIRouter()
TrainingKey = Annotated[Principal, Depends(require("training"))]


def view(row: File) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=epoch(row.created_at) or 0,
                      filename=row.filename, purpose=row.purpose)


def store_of(request: Request) -> BlobStore:
    return request.app.state.blobs


@router.post("/v1/files", response_model=FileObject)
async def create_file(request: Request, key: TrainingKey, sessions: SessionsDep,
                      settings: SettingsDep, catalog: CatalogDep) -> FileObject:
    store = store_of(request)
    upload = await receive_upload(request, store, settings.max_file_bytes)
    try:
        row = await accept(upload, org_id=key.org_id, store=store, sessions=sessions,
                           checker=lambda: file_checker(catalog, settings))
    finally:
        upload.discard()
    return view(row)


@router.get("/v1/files", response_model=FileList)
def list_files(key: TrainingKey, sessions: SessionsDep, purpose: str | None = None,
               after: str | None = None, limit: Annotated[int, Query()] = 10000,
               order: Literal["asc", "desc"] = "desc") -> FileList:
    with sessions() as s:
        rows, more = records.listing(s, key.org_id, purpose=purpose, after=after, limit=limit,
                                     newest_first=order == "desc")
    data = [view(r) for r in rows]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/v1/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, key: TrainingKey, sessions: SessionsDep) -> FileObject:
    with sessions() as s:
        return view(records.get(s, key.org_id, file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, key: TrainingKey, sessions: SessionsDep,
                 request: Request) -> FileResponse:
    with sessions() as s:
        row = records.get(s, key.org_id, file_id)
    return FileResponse(store_of(request).path(row.storage_key), filename=row.filename,
                        media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, key: TrainingKey, sessions: SessionsDep,
                request: Request) -> FileDeleted:
    with sessions.begin() as s:
        row = records.remove(s, key.org_id, file_id)
    store_of(request).delete(row.storage_key)
    return FileDeleted(id=file_id)

"""/v1/files: upload (multipart, streamed to disk), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from bastion.api.deps import ServicesDep, require
from bastion.files.upload import receive_upload
from bastion.protocol.files import PURPOSES, FileDeleted, FileList, FileObject
from bastion.services import files
from bastion.tenancy.keys import Principal

router = APIRouter()
TrainingKey = Annotated[Principal, Depends(require("training"))]


# The body is streamed to disk by receive_upload, not parsed by FastAPI: declared by hand.
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}


@router.post("/v1/files", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def create_file(request: Request, key: TrainingKey, services: ServicesDep) -> FileObject:
    upload = await receive_upload(request, services.blobs, services.settings.max_file_bytes)
    return await files.create(services, key, upload)


@router.get("/v1/files", response_model=FileList)
def list_files(key: TrainingKey, services: ServicesDep, purpose: str | None = None,
               after: str | None = None, limit: Annotated[int, Query()] = 10000,
               order: Literal["asc", "desc"] = "desc") -> FileList:
    rows, more = files.listing(services, key, purpose=purpose, after=after, limit=limit,
                               newest_first=order == "desc")
    data = [r.file for r in rows]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/v1/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, key: TrainingKey, services: ServicesDep) -> FileObject:
    return files.retrieve(services, key, file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, key: TrainingKey, services: ServicesDep) -> FileResponse:
    path, filename = files.content(services, key, file_id)
    return FileResponse(path, filename=filename, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, key: TrainingKey, services: ServicesDep) -> FileDeleted:
    return files.delete(services, key, file_id)

"""The files use cases, for POST/GET/DELETE /v1/files and the dashboard's Files page alike:
one set of rules, one set of messages. Receiving the multipart body is the transport's job;
what it received arrives here as an `Upload`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.files import records
from bastion.files.intake import accept
from bastion.files.upload import Upload
from bastion.finetune.encode import file_checker
from bastion.protocol.files import FileDeleted, FileObject, file_view
from bastion.services.context import Services
from bastion.tenancy.keys import Principal


@dataclass(frozen=True)
class FileRow:
    """A file as GET /v1/files shows it, plus what validation found (None: not validated)."""

    file: FileObject
    summary: dict[str, Any] | None


async def create(services: Services, principal: Principal, upload: Upload) -> FileObject:
    """Store the upload's 'file' part for the caller's organisation, validating fine-tuning
    data first. The upload's temporary files are always discarded."""
    settings, catalog = services.settings, services.catalog
    try:
        row = await accept(upload, org_id=principal.org_id, store=services.blobs,
                           sessions=services.sessions,
                           checker=lambda: file_checker(catalog, settings))
    finally:
        upload.discard()
    return file_view(row)


def listing(services: Services, principal: Principal, *, purpose: str | None = None,
            after: str | None = None, limit: int = 10000,
            newest_first: bool = True) -> tuple[list[FileRow], bool]:
    """A page of the organisation's files and whether more follow."""
    with services.sessions() as s:
        rows, more = records.listing(s, principal.org_id, purpose=purpose, after=after,
                                     limit=limit, newest_first=newest_first)
        return [FileRow(file_view(r), r.summary) for r in rows], more


def retrieve(services: Services, principal: Principal, file_id: str) -> FileObject:
    with services.sessions() as s:
        return file_view(records.get(s, principal.org_id, file_id))


def content(services: Services, principal: Principal, file_id: str) -> tuple[Path, str]:
    """Where the file's bytes are, and the name it was uploaded under."""
    with services.sessions() as s:
        row = records.get(s, principal.org_id, file_id)
    return services.blobs.path(row.storage_key), row.filename


def delete(services: Services, principal: Principal, file_id: str) -> FileDeleted:
    """The row first (refused while a fine-tuning job reads the file), then the blob."""
    with services.sessions.begin() as s:
        row = records.remove(s, principal.org_id, file_id)
    services.blobs.delete(row.storage_key)
    return FileDeleted(id=file_id)

"""File objects on the wire, as the `openai` SDK's client.files sees them, and the presenter
from a stored row (typed loosely: the wire layer imports nothing from db/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from bastion.protocol.common import epoch

PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def file_view(row: Any) -> FileObject:
    """`row`: a db.tables.File."""
    return FileObject(id=row.id, bytes=row.bytes, created_at=epoch(row.created_at) or 0,
                      filename=row.filename, purpose=row.purpose)

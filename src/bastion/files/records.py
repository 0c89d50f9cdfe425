"""File rows, always scoped to the caller's organisation: another organisation's file is a 404."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion.db.pagination import page
from bastion.db.tables import File, FineTuningJob, utcnow
from bastion.errors import ConflictError, NotFoundError
from bastion.finetune.states import ACTIVE_JOB_STATES
from bastion.ids import new_id

def new_file_id() -> str:
    return new_id("file")


def add(session: Session, *, file_id: str, org_id: str, filename: str, purpose: str, size: int,
        storage_key: str, summary: dict[str, Any] | None) -> File:
    row = File(id=file_id, org_id=org_id, filename=filename, purpose=purpose, bytes=size,
               storage_key=storage_key, summary=summary, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def get(session: Session, org_id: str, file_id: str, *, param: str = "file_id") -> File:
    row = session.get(File, file_id)
    if row is None or row.org_id != org_id:
        raise NotFoundError(f"No such File object: {file_id}", param=param, code="file_not_found")
    return row


def listing(session: Session, org_id: str, *, purpose: str | None, after: str | None,
            limit: int, newest_first: bool) -> tuple[list[File], bool]:
    query = select(File).where(File.org_id == org_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    return page(session, query, File, after=after, limit=limit, newest_first=newest_first)


def remove(session: Session, org_id: str, file_id: str) -> File:
    """Delete the row; a file that a queued or running job still reads cannot go."""
    row = get(session, org_id, file_id)
    busy = session.scalar(select(FineTuningJob.id).where(
        FineTuningJob.status.in_(ACTIVE_JOB_STATES),
        (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id)
    ).limit(1))
    if busy:
        raise ConflictError(f"The file {file_id} is used by fine-tuning job {busy}, which has not "
                            f"finished; cancel the job or wait for it before deleting the file.",
                            param="file_id", code="file_in_use")
    session.delete(row)
    return row

"""Accepting one parsed upload: its purpose checked, fine-tuning data validated, the blob
committed and its row written. Shared by POST /v1/files and the dashboard's upload form, so both
refuse the same files with the same messages."""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from bastion.db.tables import File
from bastion.errors import InvalidRequestError
from bastion.files import records
from bastion.files.store import BlobStore
from bastion.files.upload import Upload
from bastion.files.validate import Summary
from bastion.protocol.files import PURPOSES


async def accept(upload: Upload, *, org_id: str, store: BlobStore,
                 sessions: sessionmaker[Session],
                 checker: Callable[[], Callable[[Any], Summary]]) -> File:
    """Store the upload's 'file' part for `org_id`. `checker` makes the validator of
    fine-tuning data (only called for that purpose: it may load a tokenizer). The caller
    discards the upload's temporary files afterwards."""
    purpose = upload.fields.get("purpose")
    if not purpose:
        raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose",
                                  code="missing_required_parameter")
    if purpose not in PURPOSES:
        raise InvalidRequestError(f"Invalid value for 'purpose': {purpose!r}; expected one "
                                  f"of {', '.join(PURPOSES)}.", param="purpose",
                                  code="invalid_value")
    part = upload.files.get("file")
    if part is None:
        raise InvalidRequestError("Missing required parameter: 'file' (a file part).",
                                  param="file", code="missing_required_parameter")
    summary = None
    if purpose == "fine-tune":
        summary = (await run_in_threadpool(checker(), part.temp)).as_dict()
    file_id = records.new_file_id()
    storage_key = f"{org_id}/{file_id}"
    await run_in_threadpool(store.commit, part.temp, storage_key)
    try:
        with sessions.begin() as s:
            return records.add(s, file_id=file_id, org_id=org_id,
                               filename=clean_filename(part.filename), purpose=purpose,
                               size=part.size, storage_key=storage_key, summary=summary)
    except BaseException:
        store.delete(storage_key)
        raise


MAX_FILENAME = 255


def clean_filename(name: str | None) -> str:
    """The name a file is listed by: the last component of what the client sent, without
    control characters (PostgreSQL refuses a NUL), at most 255 characters (the column holds
    512)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable())[:MAX_FILENAME].strip()
    return base or "upload"

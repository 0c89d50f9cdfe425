"""Requests sent with an Idempotency-Key: the first one runs and its response is stored; a
retry gets that response back without generating again, or a 409 while the first is still
running. A first request that failed or was cut off leaves nothing stored, so its retry runs
(and is billed) again: nothing is ever generated that is not billed. Rows live in the database,
so every replica replays the same response, and expire after a day."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from bastion.db.tables import IdempotentResponse, utcnow
from bastion.errors import ConflictError, InvalidRequestError
from bastion.services.context import Services

TTL = timedelta(hours=24)
MAX_KEY_CHARS = 255


@dataclass(frozen=True)
class Stored:
    status_code: int
    content_type: str
    body: bytes


def digest(key: str, endpoint: str, body: bytes) -> str:
    if len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise InvalidRequestError(f"The Idempotency-Key header must be printable and at most "
                                  f"{MAX_KEY_CHARS} characters.", code="invalid_idempotency_key")
    h = hashlib.sha256()
    for part in (key.encode(), endpoint.encode(), hashlib.sha256(body).digest()):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.hexdigest()


async def claim(services: Services, org_id: str, key_digest: str) -> Stored | None:
    """None: this request is the first and runs (the caller must `finish` or `abandon`);
    else the stored response. A 409 while the first is still running."""

    def run() -> Stored | None:
        now = utcnow()
        for _ in range(2):
            try:
                with services.sessions.begin() as s:
                    s.add(IdempotentResponse(org_id=org_id, digest=key_digest, state="running",
                                             created_at=now, expires_at=now + TTL))
                return None
            except IntegrityError:
                pass
            with services.sessions.begin() as s:
                row = s.scalars(select(IdempotentResponse).where(
                    IdempotentResponse.org_id == org_id,
                    IdempotentResponse.digest == key_digest)).first()
                if row is None:
                    continue  # abandoned meanwhile: claim it
                if row.expires_at.replace(tzinfo=now.tzinfo) <= now:
                    s.delete(row)
                    continue
                if row.state == "done":
                    return Stored(row.status_code or 200, row.content_type or "application/json",
                                  row.body or b"")
        raise ConflictError(
            "A request with this Idempotency-Key is still being processed; retry once it has "
            "finished to get its response.", code="idempotency_key_in_use")

    return await run_in_threadpool(run)


async def finish(services: Services, org_id: str, key_digest: str, stored: Stored) -> None:
    def run() -> None:
        with services.sessions.begin() as s:
            s.execute(update(IdempotentResponse).where(
                IdempotentResponse.org_id == org_id,
                IdempotentResponse.digest == key_digest).values(
                state="done", status_code=stored.status_code, content_type=stored.content_type,
                body=stored.body))

    await run_in_threadpool(run)


async def abandon(services: Services, org_id: str, key_digest: str) -> None:
    def run() -> None:
        with services.sessions.begin() as s:
            s.execute(delete(IdempotentResponse).where(
                IdempotentResponse.org_id == org_id, IdempotentResponse.digest == key_digest,
                IdempotentResponse.state == "running"))

    await run_in_threadpool(run)

"""Job events: status changes, per-step metrics, validation loss and errors, newest first."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion.db.tables import FineTuningEvent, utcnow
from bastion.errors import InvalidRequestError
from bastion.ids import new_id


def add(session: Session, job_id: str, message: str, *, level: str = "info",
        type: str = "message", data: dict[str, Any] | None = None) -> None:
    session.add(FineTuningEvent(id=new_id("ftevent"), job_id=job_id, level=level,
                                message=message[:2048], type=type, data=data,
                                created_at=utcnow()))


def listing(session: Session, job_id: str, *, after: str | None,
            limit: int) -> tuple[list[FineTuningEvent], bool]:
    if not 1 <= limit <= 10_000:
        raise InvalidRequestError(f"limit must be between 1 and 10000 (got {limit}).",
                                  param="limit", code="invalid_value")
    query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
    if after is not None:
        cursor = session.scalar(query.where(FineTuningEvent.id == after))
        if cursor is None:
            raise InvalidRequestError(f"The cursor 'after={after}' is not an event of this job.",
                                      param="after", code="invalid_value")
        query = query.where(FineTuningEvent.seq < cursor.seq)
    rows = list(session.scalars(query.order_by(FineTuningEvent.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit

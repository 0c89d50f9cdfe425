"""Cursor pagination over (created_at, id), OpenAI style: `after` is the last id already seen."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from bastion.errors import InvalidRequestError

T = TypeVar("T")


def page(session: Session, query: Select[Any], model: Any, *, after: str | None, limit: int,
         newest_first: bool = True) -> tuple[list[Any], bool]:
    """One page of `query` (already filtered to the caller's rows) and whether more follow."""
    if not 1 <= limit <= 10_000:
        raise InvalidRequestError(f"limit must be between 1 and 10000 (got {limit}).",
                                  param="limit", code="invalid_value")
    if after is not None:
        cursor = session.scalar(query.where(model.id == after))
        if cursor is None:
            raise InvalidRequestError(f"The cursor 'after={after}' does not name an object of "
                                      f"this list.", param="after", code="invalid_value")
        if newest_first:
            query = query.where(or_(model.created_at < cursor.created_at,
                                    and_(model.created_at == cursor.created_at,
                                         model.id < cursor.id)))
        else:
            query = query.where(or_(model.created_at > cursor.created_at,
                                    and_(model.created_at == cursor.created_at,
                                         model.id > cursor.id)))
    order = ((model.created_at.desc(), model.id.desc()) if newest_first
             else (model.created_at.asc(), model.id.asc()))
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit

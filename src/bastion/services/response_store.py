"""Stored responses (`store`, OpenAI's default): saved when they finish, read back to continue
a conversation or to show them, always within the caller's organisation: another
organisation's response does not exist for it (404)."""

from __future__ import annotations

from typing import Any

import anyio
from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool

from bastion.db.tables import StoredResponse
from bastion.errors import InvalidRequestError, NotFoundError
from bastion.services.context import Services


async def save(services: Services, org_id: str, response: dict[str, Any],
               items: list[dict[str, Any]], conversation: list[dict[str, Any]]) -> None:
    def run() -> None:
        with services.sessions.begin() as s:
            s.add(StoredResponse(id=response["id"], org_id=org_id, model=response["model"],
                                 status=response["status"], body=response, input_items=items,
                                 conversation=conversation))

    with anyio.CancelScope(shield=True):  # a finished response is kept even if its client left
        await run_in_threadpool(run)


async def find(services: Services, org_id: str, response_id: str) -> StoredResponse | None:
    def run() -> StoredResponse | None:
        with services.sessions() as s:
            row = s.scalars(select(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.org_id == org_id)).first()
            if row is not None:
                s.expunge(row)
            return row

    return await run_in_threadpool(run)


async def get(services: Services, org_id: str, response_id: str) -> StoredResponse:
    row = await find(services, org_id, response_id)
    if row is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return row


async def previous(services: Services, org_id: str, response_id: str) -> list[dict[str, Any]]:
    """The conversation a response continues: what its model saw, then what it answered."""
    row = await find(services, org_id, response_id)
    if row is None:
        raise InvalidRequestError(f"Previous response with id '{response_id}' not found.",
                                  param="previous_response_id",
                                  code="previous_response_not_found")
    return [*row.conversation, *row.body.get("output", [])]


async def remove(services: Services, org_id: str, response_id: str) -> None:
    def run() -> int:
        with services.sessions.begin() as s:
            return s.execute(delete(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.org_id == org_id)).rowcount

    if not await run_in_threadpool(run):
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")


def page(items: list[dict[str, Any]], *, after: str | None, before: str | None, limit: int,
         order: str) -> tuple[list[dict[str, Any]], bool]:
    """One page of a response's input items (OpenAI's default order is newest first)."""
    if not 1 <= limit <= 100:
        raise InvalidRequestError(f"limit must be between 1 and 100 (got {limit}).",
                                  param="limit", code="invalid_value")
    ordered = list(reversed(items)) if order == "desc" else list(items)
    ids = [i["id"] for i in ordered]
    start, end = 0, len(ordered)
    for name, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            raise InvalidRequestError(f"The cursor '{name}={cursor}' does not name an item of "
                                      f"this response.", param=name, code="invalid_value")
    if after is not None:
        start = ids.index(after) + 1
    if before is not None:
        end = ids.index(before)
    window = ordered[start:end]
    return window[:limit], len(window) > limit

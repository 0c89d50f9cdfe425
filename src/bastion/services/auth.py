"""A raw API key to the caller behind it, for every transport (HTTP header, WebSocket message,
dashboard sign-in); counting the request is the limiter's business."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from starlette.concurrency import run_in_threadpool

from bastion.errors import AuthenticationError, AuthorizationError
from bastion.services.context import Services
from bastion.tenancy.keys import Principal, touch

log = logging.getLogger("bastion.auth")


async def authenticate(services: Services, token: str) -> Principal:
    """The caller behind a raw key, for every transport (HTTP header, WebSocket message);
    counting the request is the caller's business (the limiter)."""
    if len(token) > 512 or not token.isascii() or not token.isprintable():
        raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
    db = services.db
    find = services.key_lookup

    def record_use(key_id: str) -> None:
        with db.connect() as conn:
            touch(conn, key_id)

    # inline with SQLite, in a thread with a networked database (see KeyLookup); the
    # once-a-minute write of the key's last use goes to a thread either way
    if find.inline:
        principal, stale = find(token)
    else:
        principal, stale = await run_in_threadpool(find, token)
    if stale:
        background(record_use, principal.key_id)
    return principal


_background: set[asyncio.Future[None]] = set()


def background(fn: Callable[..., None], *args: object) -> None:
    """Run a blocking write in a worker thread without waiting for it; a failure is logged."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    _background.add(future)

    def done(f: asyncio.Future[None]) -> None:
        _background.discard(f)
        if not f.cancelled() and f.exception() is not None:
            log.warning("background write failed: %s", f.exception())

    future.add_done_callback(done)


def check_permission(principal: Principal, permission: str) -> None:
    if not principal.can(permission):
        raise AuthorizationError(
            f"This API key lacks the '{permission}' permission needed for this endpoint.")

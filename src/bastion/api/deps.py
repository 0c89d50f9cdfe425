"""Dependency aliases that read like types: CurrentKey, SettingsDep, CatalogDep, require()."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import Annotated, Callable

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from bastion.catalog.registry import Catalog
from bastion.config import Settings
from bastion.ratelimit.limiter import Limiter, Ticket
from bastion.usage.ledger import UsageRow
from bastion.errors import AuthenticationError, AuthorizationError
from bastion.tenancy.keys import Principal, verify


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def current_principal(request: Request) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationError(
            "You didn't provide an API key. Send it in the Authorization header as "
            "'Authorization: Bearer YOUR_API_KEY'.", code="missing_api_key")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "The Authorization header must be 'Bearer YOUR_API_KEY'.", code="invalid_api_key")
    if len(token) > 512:
        raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
    factory = request.app.state.sessions

    if not token.isascii() or not token.isprintable():
        raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")

    limiter: Limiter = request.app.state.limiter

    def lookup() -> Principal:
        with factory() as session:
            principal = verify(session, token)
        # Counted in the same worker thread as the lookup: with Redis this is the request's
        # one round trip at authentication, and the snapshot it brings back is what the
        # response's rate-limit headers are computed from (a 429 here carries its own).
        request.state.quota = limiter.count_request(principal)
        request.state.principal = principal
        return principal

    return await run_in_threadpool(lookup)


CurrentKey = Annotated[Principal, Depends(current_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]


def require(permission: str) -> Callable[[Principal], Principal]:
    """A dependency that lets through only keys holding `permission`."""

    def check(principal: CurrentKey) -> Principal:
        if not principal.can(permission):
            raise AuthorizationError(
                f"This API key lacks the '{permission}' permission needed for this endpoint.")
        return principal

    return check


InferenceKey = Annotated[Principal, Depends(require("inference"))]
AdminKey = Annotated[Principal, Depends(require("admin"))]


def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]


def get_limiter(request: Request) -> Limiter:
    return request.app.state.limiter


LimiterDep = Annotated[Limiter, Depends(get_limiter)]


async def admit(request: Request, principal: Principal, estimate: int, *, model: str,
                response_id: str) -> Ticket:
    """Admit the request and bill it to the ledger when it settles. The ticket also goes to
    the Gatekeeper, which settles it if the request ends before the route could (client gone
    before the stream started). A retry with the same Idempotency-Key is billed once."""
    limiter: Limiter = request.app.state.limiter
    ticket = await limiter.run(limiter.admit, request.state.quota, estimate)
    request_id = response_id
    if idem := request.headers.get("idempotency-key"):
        # a retry of the same request is billed once; another request reusing the key is not
        # free: the body is part of the id
        body = hashlib.sha256(await request.body()).hexdigest()[:32]
        request_id = f"idem:{hashlib.sha256(idem.encode()).hexdigest()[:32]}:{body}"
    ledger = request.app.state.ledger
    endpoint = request.url.path

    def bill(t: Ticket) -> None:
        ledger.record(UsageRow(
            request_id=request_id, org_id=principal.org_id, key_id=principal.key_id,
            model=model, endpoint=endpoint, prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens, status=t.status,
            latency_ms=int((time.monotonic() - t.started) * 1000),
            created_at=datetime.now(timezone.utc)))

    ticket.on_settle.append(bill)
    request.state.tickets = [*getattr(request.state, "tickets", []), ticket]
    return ticket

"""Dependency aliases that read like types: CurrentKey, SettingsDep, CatalogDep, require()."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import datetime, timezone
from typing import Annotated, Awaitable, Callable

import anyio
from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from bastion.models.catalog import Catalog, Deployment
from bastion.config import Settings
from bastion.services.context import Services
from bastion.admission.limiter import Limiter, Quota, Ticket
from bastion.usage.ledger import UsageRow
from bastion.errors import AuthenticationError, AuthorizationError, ModelNotFoundError
from bastion.services.auth import authenticate
from bastion.tenancy.keys import Principal

log = logging.getLogger("bastion.api")


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def current_principal(request: Request) -> Principal:
    """The caller, counted against its key's requests per minute. A GET or HEAD (no side
    effects) runs while the count is on its way: its response waits for it (Gatekeeper) and
    is replaced by the 429 if the key was over its rate; with Redis, the round trip overlaps
    the route instead of preceding it. Other methods are counted before the route runs."""
    return await _bearer(request, defer=False)


async def inference_principal(request: Request) -> Principal:
    """The caller of an inference route, which must hold `inference`. Its count is deferred to
    admission, which counts it in the same store call (with Redis: one round trip fewer); a
    request that ends before admission is counted when its response starts (Gatekeeper)."""
    principal = await _bearer(request, defer=True)
    check_permission(principal, "inference")
    return principal


async def _bearer(request: Request, defer: bool) -> Principal:
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
    principal = await authenticate(request.app.state.services, token)
    limiter: Limiter = request.app.state.limiter
    if defer:
        quota = limiter.deferred(principal)
    elif request.method in ("GET", "HEAD"):
        quota, request.state.counting = await limiter.count_meanwhile(principal)
    else:
        quota = await limiter.count_request(principal)
    request.state.quota = quota  # the response's rate-limit headers come from its snapshot
    request.state.principal = principal  # kept only once counted (a 429 carries its own)
    return principal


CurrentKey = Annotated[Principal, Depends(current_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]


def check_permission(principal: Principal, permission: str) -> None:
    if not principal.can(permission):
        raise AuthorizationError(
            f"This API key lacks the '{permission}' permission needed for this endpoint.")


def require(permission: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets through only keys holding `permission`. Dependencies are all
    `async def`: FastAPI runs a plain `def` in a worker thread, a hop that cost an inference
    request an eighth of its event-loop time."""

    async def check(principal: CurrentKey) -> Principal:
        check_permission(principal, permission)
        return principal

    return check


InferenceKey = Annotated[Principal, Depends(inference_principal)]


async def resolve_model(request: Request, name: str, principal: Principal) -> Deployment:
    """The model `name` as this caller's organisation sees it. A model that another replica
    has just uploaded, or its worker has just fine-tuned, is looked up in the database before
    a 404."""
    catalog: Catalog = request.app.state.catalog
    try:
        return catalog.resolve(name, principal.org_id)
    except ModelNotFoundError:
        pass
    await request.app.state.org_models.sync()
    return catalog.resolve(name, principal.org_id)


async def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]


async def get_limiter(request: Request) -> Limiter:
    return request.app.state.limiter


LimiterDep = Annotated[Limiter, Depends(get_limiter)]


async def admit(request: Request, principal: Principal, estimate: int, *, model: str,
                response_id: str) -> Ticket:
    """Admit the request and bill it to the ledger when it settles. The ticket also goes to
    the Gatekeeper, which settles it if the request ends before the route could (client gone
    before the stream started). A retry with the same Idempotency-Key is billed once."""
    request_id = response_id
    if idem := request.headers.get("idempotency-key"):
        # a retry of the same request is billed once; another request reusing the key is not
        # free: the body is part of the id
        body = hashlib.sha256(await request.body()).hexdigest()[:32]
        request_id = f"idem:{hashlib.sha256(idem.encode()).hexdigest()[:32]}:{body}"
    if not hasattr(request.state, "tickets"):
        request.state.tickets = []
    ticket = await open_ticket(request.app.state,
                               getattr(request.state, "quota", None) or principal, estimate,
                               model=model, request_id=request_id, endpoint=request.url.path,
                               held=request.state.tickets)
    ticket.after_response = True  # the Gatekeeper writes its release (Redis) after the response
    return ticket


async def open_ticket(state: State, quota: Quota | Principal, estimate: int, *, model: str,
                      request_id: str, endpoint: str, held: list[Ticket]) -> Ticket:
    """Admission against the plan, and one ledger row when the ticket settles; shared by the
    HTTP routes, the WebSocket API and the playground. Pass the request's Quota (from
    counting it) so that its headers follow the admission. The ticket goes into `held` before
    anything can cancel the caller, so whoever owns `held` can always settle it (a slot is
    never lost)."""
    principal = quota.principal if isinstance(quota, Quota) else quota
    ledger = state.ledger

    def bill(t: Ticket) -> None:
        ledger.record(UsageRow(
            request_id=request_id, org_id=principal.org_id, key_id=principal.key_id,
            model=model, endpoint=endpoint, prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens, status=t.status,
            latency_ms=int((time.monotonic() - t.started) * 1000),
            created_at=datetime.now(timezone.utc)))

    limiter: Limiter = state.limiter
    with anyio.CancelScope(shield=True):
        ticket = await limiter.admit(quota, estimate)
        ticket.on_settle.append(bill)
        held.append(ticket)
    return ticket

"""Dependency aliases that read like types: ServicesDep, CurrentKey, InferenceContext, require().

Every authenticated request gets a typed RequestContext from the admission gate (bound to the
request's scope for the gate's HTTP binding, api/admission.py); routes read what they need
from the one Services object instead of loose `app.state` attributes."""

from __future__ import annotations

from typing import Annotated, Awaitable, Callable

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from bastion.admission.gate import RequestContext
from bastion.admission.limiter import Limiter
from bastion.http.admission import enter
from bastion.config import Settings
from bastion.errors import AuthenticationError
from bastion.models.catalog import Catalog
from bastion.services.auth import authenticate, check_permission
from bastion.services.context import Services
from bastion.tenancy.keys import Principal


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_catalog(services: ServicesDep) -> Catalog:
    return services.catalog


async def get_sessions(services: ServicesDep) -> sessionmaker[Session]:
    return services.sessions


async def get_limiter(services: ServicesDep) -> Limiter:
    return services.limiter


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
LimiterDep = Annotated[Limiter, Depends(get_limiter)]


def bearer_token(request: Request) -> str:
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
    return token


async def current_principal(request: Request, services: ServicesDep) -> Principal:
    """The caller, counted against its key's requests per minute."""
    principal = await authenticate(services, bearer_token(request))
    await enter(request, services, principal, inference=False)
    return principal


async def inference_context(request: Request, services: ServicesDep) -> RequestContext:
    """The caller of an inference route, which must hold `inference`, through the gate."""
    principal = await authenticate(services, bearer_token(request))
    check_permission(principal, "inference")
    return await enter(request, services, principal, inference=True)


CurrentKey = Annotated[Principal, Depends(current_principal)]
InferenceContext = Annotated[RequestContext, Depends(inference_context)]


def require(permission: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets through only keys holding `permission`. Dependencies are all
    `async def`: FastAPI runs a plain `def` in a worker thread, a hop that cost an inference
    request an eighth of its event-loop time."""

    async def check(principal: CurrentKey) -> Principal:
        check_permission(principal, permission)
        return principal

    return check

"""GET /health: liveness for anyone (load balancers send no key); each engine's queue only to
a caller with a valid key, since model names and queue depths tell an outsider what runs here
and how busy it is."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from bastion.api.deps import ServicesDep, bearer_token
from bastion.services.auth import authenticate

router = APIRouter()


@router.get("/health")
async def health(request: Request, services: ServicesDep) -> dict[str, Any]:
    status = {"status": "draining" if services.lifecycle.draining else "ok"}
    if request.headers.get("authorization") is None:
        return status
    await authenticate(services, bearer_token(request))  # a wrong key is a 401, not a hint
    return {**status, "models": {d.id: d.engine.stats() for d in services.catalog.visible(None)}}

"""GET /health (liveness) and GET /ready (readiness), for operators and load balancers. Neither
needs a key: probes cannot send one. /health adds each engine's queue only for a caller with a
valid key, since model names and queue depths tell an outsider what runs here and how busy it
is."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bastion.api.deps import ServicesDep, bearer_token
from bastion.services.auth import authenticate
from bastion.services.readiness import readiness

router = APIRouter()


@router.get("/health")
async def health(request: Request, services: ServicesDep) -> dict[str, Any]:
    status = {"status": "draining" if services.lifecycle.draining else "ok"}
    if request.headers.get("authorization") is None:
        return status
    await authenticate(services, bearer_token(request))  # a wrong key is a 401, not a hint
    return {**status, "models": {d.id: d.engine.stats() for d in services.catalog.visible(None)}}


@router.get("/ready")
async def ready(services: ServicesDep) -> JSONResponse:
    ok, body = await readiness(services)
    return JSONResponse(body, status_code=200 if ok else 503)

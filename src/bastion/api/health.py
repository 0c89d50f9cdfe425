"""GET /health (liveness plus each engine's queue) and GET /ready (readiness), for operators and
load balancers. Neither needs a key: probes cannot send one, and neither says more than which
public models are served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from bastion.api.deps import ServicesDep
from bastion.services.readiness import readiness

router = APIRouter()


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, Any]:
    return {"status": "draining" if services.lifecycle.draining else "ok",
            "models": {d.id: d.engine.stats() for d in services.catalog.visible(None)}}


@router.get("/ready")
async def ready(services: ServicesDep) -> JSONResponse:
    ok, body = await readiness(services)
    return JSONResponse(body, status_code=200 if ok else 503)

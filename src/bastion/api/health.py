"""GET /health: liveness plus each engine's queue, for operators and load balancers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from bastion.api.deps import ServicesDep

router = APIRouter()


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, Any]:
    return {"status": "draining" if services.lifecycle.draining else "ok",
            "models": {d.id: d.engine.stats() for d in services.catalog.visible(None)}}

"""GET /health: liveness plus each engine's queue, for operators and load balancers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {"status": "draining" if state.lifecycle.draining else "ok",
            "models": {d.id: d.engine.stats() for d in state.catalog.visible(None)}}
